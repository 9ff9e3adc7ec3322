"""Visual Genome region descriptions: one sample per image with all its region phrases.

Pixel-BERT pre-trains on VG's 5.41M region phrases over 108K images. Images live in two
folders (VG_100K, VG_100K_2); ``image_data.json``'s url names the folder. Each sample
keeps VG's ``coco_id`` so images shared with COCO's val/test can be excluded later.
"""

from __future__ import annotations

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

SOURCE = "vg"


def _locate(url: str, image_id: int, dirs: list[Path]) -> Path:
    """The image file for a VG url: in the folder the url names, else in whichever folder
    holds it (urls and downloads disagree: VG_100K vs VG_100K_2). Missing everywhere: the
    path in the url's folder (or the first), which the builder then reports missing."""
    name = url.rsplit("/", 1)[-1] if url else f"{image_id}.jpg"
    folder = url.rsplit("/", 2)[-2] if url.count("/") >= 1 else ""
    ordered = sorted(dirs, key=lambda d: d.name != folder)  # the url's folder first
    for d in ordered:
        if (d / name).is_file():
            return d / name
    return ordered[0] / name


def _image_table(image_data_json) -> dict[int, dict]:
    table = {}
    for n, entry in enumerate(read_json(image_data_json, kind=list)):
        try:
            image_id = int(entry["image_id"] if "image_id" in entry else entry["id"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"{image_data_json}: entry {n} has no usable image_id ({type(err).__name__}: {err})"
            ) from None
        table[image_id] = entry
    return table


def vg_items(regions_json, image_data_json, image_dirs) -> tuple[list[Item], list[dict]]:
    dirs = [Path(d) for d in image_dirs]
    if not dirs:
        raise ValueError("give at least one Visual Genome image folder (VG_100K, VG_100K_2)")
    table = _image_table(image_data_json)
    items, pre_skipped = [], []
    for n, entry in enumerate(read_json(regions_json, kind=list)):
        try:
            image_id = int(entry["id"] if "id" in entry else entry["image_id"])
            phrases = [r["phrase"] for r in entry["regions"]]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{regions_json}: entry {n} is malformed ({type(err).__name__}: {err})") from None
        if image_id not in table:
            pre_skipped.append(skip(f"image_id {image_id}", f"not in {Path(image_data_json).name}"))
            continue
        info = table[image_id]
        file = _locate(str(info.get("url", "")), image_id, dirs)
        captions, skipped = clean_captions(phrases, str(file))
        if not captions:
            pre_skipped.extend(drop_uncaptioned(file, skipped))
            continue
        items.append(
            Item(
                key=image_key(SOURCE, image_id),
                image_id=str(image_id),
                source=SOURCE,
                captions=captions,
                file=str(file),
                skipped=skipped,
                extra={"coco_id": info.get("coco_id")},
            )
        )
    items.sort(key=lambda it: int(it.image_id))
    return items, pre_skipped


def build_vg(out_dir, regions_json, image_data_json, image_dirs, **kwargs) -> dict[str, BuildResult]:
    items, pre_skipped = vg_items(regions_json, image_data_json, image_dirs)
    return {SOURCE: build_split(items, out_dir, SOURCE, SOURCE, pre_skipped=pre_skipped, **kwargs)}
