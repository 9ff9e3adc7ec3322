"""Images without captions: the fine-tuning images no caption set covers.

NLVR2's photos (``train/0..99/*.png``, ``dev/*.png``, ``test1/*.png``) and VQA 2.0's
test-dev/test-std questions, which ask about COCO's ``test2015`` images, have no captions
to pre-train on but must be in shards for fine-tuning to read them by key. Keys follow
the readers' defaults:

- ``coco``: ``coco{id}`` from ``COCO_test2015_000000000001.jpg`` (or ``000000000001.jpg``),
  the key the COCO caption builder gives the same id and ``vqa.key_format`` builds;
- ``nlvr2``: the file's stem, ``dev-850-0-img0``, the name NLVR2's json lines use and
  ``nlvr2.key_format`` (``{name}``) keeps.

Samples carry ``captions: []``: a pre-training loader pointed at them stops with
"has no 'captions'".
"""

from __future__ import annotations

import re
from pathlib import Path

from pixelbert_dist.data.builders.common import BuildResult, Item, build_split, image_key, skip

SUFFIXES = {".jpg", ".jpeg", ".png"}
_COCO_ID = re.compile(r"(?:^|_)(\d+)$")  # COCO_test2015_000000000001 / 000000000001
_NLVR2_NAME = re.compile(r"^[A-Za-z0-9]+-\d+-\d+-img[01]$")


def _coco(stem: str) -> tuple[str, str] | None:
    match = _COCO_ID.search(stem)
    return (image_key("coco", int(match.group(1))), str(int(match.group(1)))) if match else None


def _nlvr2(stem: str) -> tuple[str, str] | None:
    return (stem, stem) if _NLVR2_NAME.match(stem) else None


KINDS = {"coco": _coco, "nlvr2": _nlvr2}


def _files(image_dirs) -> list[Path]:
    files = []
    for folder in map(Path, image_dirs):
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder {folder} not found")
        files += sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES)
    return files


def image_items(image_dirs, kind: str) -> tuple[list[Item], list[dict]]:
    """One caption-less item per image file under ``image_dirs`` (searched recursively),
    in folder then path order; a file whose name does not fit ``kind`` is skipped."""
    if kind not in KINDS:
        raise ValueError(f"unknown image kind {kind!r}: choose one of {sorted(KINDS)}")
    items, pre_skipped = [], []
    for file in _files(image_dirs):
        named = KINDS[kind](file.stem)
        if named is None:
            pre_skipped.append(skip(file, f"file name does not look like a {kind} image"))
            continue
        key, image_id = named
        items.append(Item(key=key, image_id=image_id, source=kind, captions=[], file=str(file)))
    return items, pre_skipped


def build_images(out_dir, image_dirs, kind: str, name: str | None = None, **kwargs) -> dict[str, BuildResult]:
    items, pre_skipped = image_items(image_dirs, kind)
    name = name or f"{kind}_images"
    return {name: build_split(items, out_dir, name, kind, pre_skipped=pre_skipped, **kwargs)}
