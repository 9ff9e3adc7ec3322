"""Tiny on-disk data sets in the official formats, written with PIL, for tests.

Import as ``from tests.fixtures_data import ...`` (tests run from the repo root).
Every writer returns the paths it made plus what a correct builder must produce:
``expected`` maps each image that must be written to its captions, ``bad`` maps each
image file that must land in skipped.jsonl to a word its reason contains.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

RED, BLUE = (230, 20, 20), (20, 20, 230)
# kind -> a word the builder's skip reason must contain (None: the image is good)
KINDS = {
    "rgb": None,
    "gray": None,
    "cmyk": None,
    "png": None,
    "palette": None,
    "exif": None,
    "corrupt": "unreadable",
    "truncated": "unreadable",
    "missing": "missing",
}


def two_tone(width: int = 40, height: int = 20) -> Image.Image:
    """Left half red, right half blue: shows which way an image was turned."""
    image = Image.new("RGB", (width, height), BLUE)
    image.paste(RED, (0, 0, width // 2, height))
    return image


def noise_image(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def write_image(path: str | Path, kind: str, seed: int = 0) -> Path:
    """Write one image of ``kind`` (see KINDS) at ``path`` ("missing" writes nothing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "rgb":
        noise_image(seed=seed).save(path, "JPEG", quality=90)
    elif kind == "gray":
        noise_image(seed=seed).convert("L").save(path, "JPEG")
    elif kind == "cmyk":
        Image.new("CMYK", (32, 24), (0, 255, 255, 0)).save(path, "JPEG")
    elif kind == "png":  # PNG bytes behind a .jpg name, with an alpha channel
        Image.new("RGBA", (30, 20), (0, 200, 0, 255)).save(path, "PNG")
    elif kind == "palette":
        two_tone().convert("P").save(path, "PNG")
    elif kind == "exif":  # stored 40x20, orientation 6: shown upright it is 20x40, red on top
        exif = Image.Exif()
        exif[0x0112] = 6
        two_tone().save(path, "JPEG", quality=95, exif=exif.tobytes())
    elif kind == "corrupt":
        path.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 4)
    elif kind == "truncated":
        buf = io.BytesIO()
        noise_image(seed=seed).save(buf, "JPEG", quality=95)
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    elif kind != "missing":
        raise ValueError(f"unknown image kind {kind!r}")
    return path


def write_coco(root: str | Path) -> dict:
    """COCO captions_*.json + images: every KIND, plus caption edge cases."""
    root = Path(root)
    images_dir = root / "train2017"
    images, annotations, expected, bad = [], [], {}, {}
    kinds = list(KINDS) + ["rgb", "rgb"]  # 10: one empty caption, 11: only empty captions
    for image_id, kind in enumerate(kinds, start=1):
        name = f"{image_id:012d}.jpg"
        write_image(images_dir / name, kind, seed=image_id)
        images.append({"id": image_id, "file_name": name, "width": 1, "height": 1})
        caps = [f"image {image_id} caption {j}" for j in range(2)]
        if image_id == len(KINDS) + 1:
            caps.append("   ")
        if image_id == len(KINDS) + 2:
            caps = ["", " \t"]
        annotations += [{"id": 100 * image_id + j, "image_id": image_id, "caption": c} for j, c in enumerate(caps)]
        kept = [c for c in caps if c.strip()]
        if KINDS[kind] is not None:
            bad[name] = KINDS[kind]
        elif kept:
            expected[image_id] = kept
        else:
            bad[name] = "empty"
    annotations.append({"id": 99999, "image_id": 424242, "caption": "no such image"})
    captions = root / "captions_train2017.json"
    captions.write_text(json.dumps({"images": images, "annotations": annotations}))
    return {
        "captions": captions,
        "images": images_dir,
        "expected": expected,
        "bad": bad,
        "kinds": dict(enumerate(kinds, start=1)),
    }


def write_karpathy(root: str | Path, flickr: bool = False) -> dict:
    """A Karpathy split file (COCO form with filepath/cocoid, or Flickr30K form)."""
    root = Path(root)
    splits = ["train", "restval", "val", "test", "train", "test"]
    entries, expected = [], {"train": {}, "val": {}, "test": {}}
    for i, split in enumerate(splits):
        folder = "" if flickr else ("train2014" if split == "train" else "val2014")
        name = f"{1000 + i}.jpg" if flickr else f"COCO_{folder}_{i + 1:012d}.jpg"
        write_image(root / "images" / folder / name, "rgb", seed=i)
        caps = [f"split {split} image {i} sentence {j}" for j in range(3)]
        entry = {
            "filename": name,
            "split": split,
            "imgid": i,
            "sentences": [{"raw": c, "tokens": c.split()} for c in caps],
        }
        if not flickr:
            entry.update(filepath=folder, cocoid=i + 1)
        entries.append(entry)
        image_id = str(i if flickr else i + 1)
        expected["train" if split == "restval" else split][image_id] = caps
    path = root / ("dataset_flickr30k.json" if flickr else "dataset_coco.json")
    path.write_text(json.dumps({"dataset": "flickr30k" if flickr else "coco", "images": entries}))
    return {"karpathy": path, "images": root / "images", "expected": expected}


def write_vg(root: str | Path) -> dict:
    """Visual Genome region_descriptions.json + image_data.json over VG_100K and VG_100K_2."""
    root = Path(root)
    dirs = [root / "VG_100K", root / "VG_100K_2"]
    kinds = ["rgb", "exif", "gray", "corrupt", "missing", "rgb"]
    image_data, regions, expected, bad = [], [], {}, {}
    for image_id, kind in enumerate(kinds, start=1):
        folder = dirs[image_id % 2]
        write_image(folder / f"{image_id}.jpg", kind, seed=image_id)
        image_data.append(
            {
                "image_id": image_id,
                "width": 1,
                "height": 1,
                "coco_id": None,
                "flickr_id": None,
                "url": f"https://example.org/rak248/{folder.name}/{image_id}.jpg",
            }
        )
        phrases = [f"region {j} of image {image_id}" for j in range(3)]
        if image_id == len(kinds):
            phrases.append("")
        regions.append(
            {
                "id": image_id,
                "regions": [
                    {
                        "region_id": 10 * image_id + j,
                        "image_id": image_id,
                        "phrase": p,
                        "x": 0,
                        "y": 0,
                        "width": 5,
                        "height": 5,
                    }
                    for j, p in enumerate(phrases)
                ],
            }
        )
        if KINDS[kind] is None:
            expected[image_id] = [p for p in phrases if p]
        else:
            bad[f"{image_id}.jpg"] = KINDS[kind]
    (root / "region_descriptions.json").write_text(json.dumps(regions))
    (root / "image_data.json").write_text(json.dumps(image_data))
    return {
        "regions": root / "region_descriptions.json",
        "image_data": root / "image_data.json",
        "images": dirs,
        "expected": expected,
        "bad": bad,
    }


def write_jsonl(root: str | Path) -> dict:
    """data.jsonl: relative and absolute image paths; repeated images merge their captions."""
    root = Path(root)
    write_image(root / "pics" / "a.jpg", "rgb", seed=1)
    write_image(root / "pics" / "b.jpg", "png")
    absolute = write_image(root / "elsewhere" / "c.jpg", "exif").resolve()
    write_image(root / "pics" / "bad.jpg", "truncated")
    lines = [
        {"image": "pics/a.jpg", "caption": "first caption of a"},
        {"image": "pics/b.jpg", "caption": "a green box"},
        {"image": str(absolute), "caption": "red above blue"},
        {"image": "pics/a.jpg", "caption": "second caption of a"},
        {"image": "pics/bad.jpg", "caption": "never written"},
        {"image": "pics/b.jpg", "caption": "  "},
    ]
    path = root / "data.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    expected = {
        "pics/a.jpg": ["first caption of a", "second caption of a"],
        "pics/b.jpg": ["a green box"],
        str(absolute): ["red above blue"],
    }
    return {"file": path, "expected": expected, "bad": {"bad.jpg": "unreadable", "b.jpg": "empty"}}


def make_synthetic_shards(
    out_dir: str | Path, num: int = 24, seed: int = 0, samples_per_shard: int = 8, val_fraction: float = 0.25
) -> dict:
    """A small synthetic set in the shard format: {"train": Path, "val": Path}."""
    from pixelbert_dist.data.builders.synthetic import build_synthetic

    results = build_synthetic(
        out_dir,
        num,
        seed=seed,
        val_fraction=val_fraction,
        min_size=64,
        max_size=128,
        samples_per_shard=samples_per_shard,
        progress=False,
    )
    return {split: result.directory for split, result in results.items()}
