"""Any image–caption set as JSON lines: ``{"image": path, "caption": text}`` per line.

Relative image paths are taken from the jsonl file's folder. Lines for the same image
merge into one sample (in first-appearance order), as COCO's five captions do; "the same
image" is the same file however the line spells it (``a.jpg``, ``./a.jpg``, an absolute
path, a symlink). A file with no line at all is an error, not an empty split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

from pixelbert_dist.data.builders.common import BuildResult, Item, build_split, clean_captions, drop_uncaptioned, skip

SOURCE = "jsonl"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
log = logging.getLogger(__name__)


def _read_lines(path: Path) -> list[tuple[str, object]]:
    if not path.is_file():
        raise FileNotFoundError(f"jsonl file {path} not found")
    pairs = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8 ({err})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                pairs.append((str(record["image"]), record["caption"]))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(
                    f'{path}:{lineno}: expected {{"image": ..., "caption": ...}} ({type(err).__name__}: {err})'
                ) from None
    if not pairs:
        raise ValueError(f'{path}: no {{"image": ..., "caption": ...}} line in it (empty file?)')
    return pairs


def _canonical(image: str, folder: Path) -> tuple[str, Path]:
    """(name, file) of an image as a line spells it: the name is the resolved path relative
    to the jsonl's folder when it lies inside (so keys survive moving the whole folder),
    else the resolved absolute path."""
    file = (folder / image).resolve()  # an absolute ``image`` replaces ``folder``
    try:
        return file.relative_to(folder.resolve()).as_posix(), file
    except ValueError:
        return file.as_posix(), file


def jsonl_items(jsonl_path: str | Path) -> tuple[list[Item], list[dict]]:
    path = Path(jsonl_path)
    merged: dict[str, list] = {}
    first: dict[str, tuple[str, Path]] = {}  # canonical name -> (first spelling, file)
    url_skips = []
    for image, caption in _read_lines(path):
        if _URL.match(image):
            url_skips.append(skip(image, "image is a URL: URLs are not fetched (download the images first)"))
            continue
        name, file = _canonical(image, path.parent)
        first.setdefault(name, (image, file))
        merged.setdefault(name, []).append(caption)
    if url_skips:
        log.warning(
            "%s: %d image(s) given as URLs, e.g. %s: URLs are not fetched", path, len(url_skips), url_skips[0]["file"]
        )
    items, pre_skipped = [], url_skips
    for name, raw in merged.items():
        image, file = first[name]
        captions, skipped = clean_captions(raw, str(file))
        if not captions:
            pre_skipped.extend(drop_uncaptioned(file, skipped))
            continue
        # The key is a hash of the canonical name: stable across reruns and dot-free.
        key = SOURCE + hashlib.sha1(name.encode()).hexdigest()[:16]
        items.append(
            Item(
                key=key,
                image_id=image,
                source=SOURCE,
                captions=captions,  # as first written
                file=str(file),
                skipped=skipped,
            )
        )
    return items, pre_skipped


def build_jsonl(out_dir, jsonl_path, name: str = SOURCE, **kwargs) -> dict[str, BuildResult]:
    items, pre_skipped = jsonl_items(jsonl_path)
    return {name: build_split(items, out_dir, name, SOURCE, pre_skipped=pre_skipped, **kwargs)}
