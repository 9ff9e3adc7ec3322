"""COCO Captions (official ``captions_*.json``) and Karpathy split files (COCO, Flickr30K).

One sample per image with all of its captions. The Karpathy file (``dataset_coco.json``
or ``dataset_flickr30k.json``) gives the train/val/test split used by Pixel-BERT's
retrieval numbers; its ``restval`` images go to train, as everyone does.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from pixelbert_dist.data.builders.common import (
    BuildResult,
    Item,
    build_split,
    clean_captions,
    drop_uncaptioned,
    image_key,
    read_json,
    skip,
)

log = logging.getLogger(__name__)
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def _item(source: str, image_id, file: Path, raw_captions: list, pre_skipped: list) -> Item | None:
    captions, skipped = clean_captions(raw_captions, str(file))
    if not captions:
        pre_skipped.extend(drop_uncaptioned(file, skipped))
        return None
    return Item(
        key=image_key(source, image_id),
        image_id=str(image_id),
        source=source,
        captions=captions,
        file=str(file),
        skipped=skipped,
    )


def coco_items(captions_json: str | Path, images_dir: str | Path) -> tuple[list[Item], list[dict]]:
    """Items (sorted by image id) and pre-skipped entries from an official captions file."""
    data = read_json(captions_json, required=("images", "annotations"))
    files, pre_skipped = {}, []
    try:
        for im in data["images"]:
            if files.setdefault(int(im["id"]), im["file_name"]) != im["file_name"]:
                pre_skipped.append(
                    skip(
                        Path(images_dir) / im["file_name"],
                        f"duplicate image id {im['id']}: written once, from {files[int(im['id'])]}",
                    )
                )
        by_image = defaultdict(list)
        for ann in data["annotations"]:
            by_image[int(ann["image_id"])].append(ann["caption"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{captions_json}: malformed COCO captions file ({type(err).__name__}: {err})") from None
    pre_skipped += [
        skip(f"image_id {i}", f"annotation for unknown image id {i}", kind="caption")
        for i in sorted(set(by_image) - set(files))
        for _ in by_image[i]
    ]
    items = []
    for image_id in sorted(files):
        item = _item("coco", image_id, Path(images_dir) / files[image_id], by_image.get(image_id, []), pre_skipped)
        if item is not None:
            items.append(item)
    return items, pre_skipped


def _dataset_name(data: dict, path: Path) -> str:
    """The file's own ``dataset`` field, else the name Karpathy's files carry
    (``dataset_flickr30k.json``: flickr30k), else coco."""
    if data.get("dataset"):
        return str(data["dataset"])
    stem = path.stem.lower()
    return stem.removeprefix("dataset_") if stem.startswith("dataset_") and stem != "dataset_" else "coco"


def _require_folder(images_dir) -> None:
    if not Path(images_dir).is_dir():
        raise FileNotFoundError(f"--images folder {images_dir} not found (or not a folder)")


def karpathy_items(split_json: str | Path, images_dir: str | Path):
    """{"train"|"val"|"test": (items, pre_skipped)} from a Karpathy split file."""
    data = read_json(split_json, required=("images",))
    source = _dataset_name(data, Path(split_json))
    out = {split: ([], []) for split in ("train", "val", "test")}
    first: dict[str, tuple[int, str]] = {}  # image id -> (images[n], split) of its first entry
    for n, entry in enumerate(data["images"]):
        if isinstance(entry, dict) and entry.get("split") not in KARPATHY_SPLITS:
            raise ValueError(
                f"{split_json}: images[{n}] has split {entry.get('split')!r}: expected one of {sorted(KARPATHY_SPLITS)}"
            )
        try:
            split = KARPATHY_SPLITS[entry["split"]]
            image_id = entry["cocoid"] if "cocoid" in entry else entry["imgid"]
            file = Path(images_dir) / entry.get("filepath", "") / entry["filename"]
            raw = [s["raw"] for s in entry["sentences"]]
        except (KeyError, TypeError) as err:
            raise ValueError(f"{split_json}: images[{n}] is malformed ({type(err).__name__}: {err})") from None
        items, pre_skipped = out[split]
        where = first.setdefault(str(image_id), (n, entry["split"]))
        if where[0] != n:  # twice in the file (maybe in two splits: a train/test leak)
            pre_skipped.append(
                skip(
                    file,
                    f"duplicate image id {image_id}: images[{n}] ({entry['split']}) "
                    f"repeats images[{where[0]}] ({where[1]}), written once",
                )
            )
            log.warning(
                "%s: image id %s appears at images[%d] and images[%d]: written once", split_json, image_id, where[0], n
            )
            continue
        item = _item(source, image_id, file, raw, pre_skipped)
        if item is not None:
            items.append(item)
    for items, _ in out.values():
        items.sort(key=lambda it: (len(it.image_id), it.image_id))
    return out


def build_coco(
    out_dir: str | Path, images_dir: str | Path, captions_json=None, karpathy_json=None, **kwargs
) -> dict[str, BuildResult]:
    """``captions_json`` writes ``out_dir``; ``karpathy_json`` writes out_dir/{train,val,test}."""
    if (captions_json is None) == (karpathy_json is None):
        raise ValueError(
            "give exactly one of captions_json (official COCO file) or karpathy_json (Karpathy split file)"
        )
    _require_folder(images_dir)
    if captions_json is not None:
        items, pre_skipped = coco_items(captions_json, images_dir)
        return {"coco": build_split(items, out_dir, "coco", "coco", pre_skipped=pre_skipped, **kwargs)}
    results = {}
    for split, (items, pre_skipped) in karpathy_items(karpathy_json, images_dir).items():
        if not items and not pre_skipped:  # e.g. a file with train and test only
            log.warning("%s: no %s image in it: the %s split is not written", karpathy_json, split, split)
            continue
        source = items[0].source if items else _dataset_name(read_json(karpathy_json), Path(karpathy_json))
        results[split] = build_split(items, Path(out_dir) / split, split, source, pre_skipped=pre_skipped, **kwargs)
    return results
