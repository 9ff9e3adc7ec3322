"""Any image–caption set as JSON lines: ``{"image": path, "caption": text}`` per line.

Relative image paths are taken from the jsonl file's folder. Lines for the same image
merge into one sample (in first-appearance order), as COCO's five captions do.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pixelbert_dist.data.builders.common import BuildResult, Item, build_split, clean_captions

SOURCE = "jsonl"


def _read_lines(path: Path) -> list[tuple[str, object]]:
    if not path.is_file():
        raise FileNotFoundError(f"jsonl file {path} not found")
    pairs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                pairs.append((str(record["image"]), record["caption"]))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{lineno}: expected {{\"image\": ..., \"caption\": ...}} "
                                 f"({type(err).__name__}: {err})") from None
    return pairs


def jsonl_items(jsonl_path: str | Path) -> tuple[list[Item], list[dict]]:
    path = Path(jsonl_path)
    merged: dict[str, list] = {}
    for image, caption in _read_lines(path):
        merged.setdefault(image, []).append(caption)
    items, pre_skipped = [], []
    for image, raw in merged.items():
        file = Path(image) if Path(image).is_absolute() else path.parent / image
        captions, skipped = clean_captions(raw, str(file))
        if not captions:
            pre_skipped.extend(skipped)
            continue
        # The key is a hash of the path as written: stable across reruns and dot-free.
        key = SOURCE + hashlib.sha1(image.encode()).hexdigest()[:16]
        items.append(Item(key=key, image_id=image, source=SOURCE, captions=captions,
                          file=str(file), skipped=skipped))
    return items, pre_skipped


def build_jsonl(out_dir, jsonl_path, name: str = SOURCE, **kwargs) -> dict[str, BuildResult]:
    items, pre_skipped = jsonl_items(jsonl_path)
    return {name: build_split(items, out_dir, name, SOURCE, pre_skipped=pre_skipped, **kwargs)}
