"""Shared by the foreign-shard tests: a set laid out as img2dataset writes it (the
webdataset output of ``img2dataset --output_format webdataset``), made here from real
images, with what such sets hold in the wild.

``write_img2dataset_set(DIR)`` writes ``00000.tar .. 00002.tar`` of 30 samples each: keys
``SSSSSIIII`` (shard, index), ``KEY.jpg`` (or ``.webp`` / ``.png``), ``KEY.txt`` and
``KEY.json`` (url, key, status, caption, width, height), every member behind a PAX header
(``tarfile.PAX_FORMAT``), ``NNNNN_stats.json`` and ``NNNNN.parquet`` beside each tar. And the
odd ones: sample ``000000005`` has its caption only in the JSON, ``000000007`` none at all,
``000010003`` no image, ``000010011`` dotted member names (``000010011.hq.jpg``: webdataset's
key is ``000010011``), and the last tar ends cut inside sample ``CUT_AT``'s image.

Import as ``from tests.foreign_helpers import ...`` (tests run from the repo root).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

SHARDS, PER_SHARD = 3, 30
FOREIGN_PATTERN = "{00000..00002}.tar"
JSON_ONLY, NO_CAPTION, NO_IMAGE, DOTTED = "000000005", "000000007", "000010003", "000010011"
CUT_AT = 20  # the last tar is cut inside the image of its sample 20


def image_bytes(kind: str, height: int, width: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + 2 * y) % 256], -1)
    pixels = np.clip(pixels + rng.normal(0, 4, pixels.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    if kind == "png":
        Image.fromarray(pixels).convert("RGBA").save(buf, "PNG")  # alpha: decoded to RGB
    elif kind == "webp":
        Image.fromarray(pixels).save(buf, "WEBP", quality=90)
    else:
        Image.fromarray(pixels).save(buf, "JPEG", quality=92)
    return buf.getvalue()


def _kind(i: int) -> str:
    return {3: "webp", 4: "png"}.get(i % 6, "jpg")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
    info.pax_headers = {"comment": "img2dataset"}  # every member gets its own PAX header
    tar.addfile(info, io.BytesIO(data))


def _sample_members(shard: int, i: int, json_fields=None) -> tuple[str, list[tuple[str, bytes]], dict]:
    key = f"{shard:05d}{i:04d}"
    height, width = 60 + (i * 7) % 50, 70 + (i * 11) % 60
    caption = f"photo {key} of a dog on the left"
    meta = {"url": f"http://example.com/{key}.jpg", "key": key, "status": "success", "caption": caption}
    meta.update(width=width, height=height, **(json_fields(key) if json_fields else {}))
    base = f"{key}.hq" if key == DOTTED else key
    members = []
    if key != NO_IMAGE:
        members.append((f"{base}.{_kind(i)}", image_bytes(_kind(i), height, width, shard * 100 + i)))
    if key not in (JSON_ONLY, NO_CAPTION):
        members.append((f"{base}.txt", caption.encode()))
    if key == NO_CAPTION:
        meta.pop("caption")
    members.append((f"{base}.json", json.dumps(meta).encode()))
    return key, members, meta


def write_img2dataset_set(directory, json_fields=None) -> dict:
    """The set in ``directory``; returns {key: caption} of the samples a reader must yield
    (image and caption present, before the cut). ``json_fields(key)``: more fields for
    that sample's JSON (a dict; they do not change what is returned)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    expected, cut_offset = {}, None
    for shard in range(SHARDS):
        path = directory / f"{shard:05d}.tar"
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            for i in range(PER_SHARD):
                key, members, meta = _sample_members(shard, i, json_fields)
                if shard == SHARDS - 1 and i == CUT_AT:
                    cut_offset = tar.offset + 5 * tarfile.BLOCKSIZE  # inside this image's data
                for name, data in members:
                    _add(tar, name, data)
                if key not in (NO_IMAGE, NO_CAPTION) and not (shard == SHARDS - 1 and i >= CUT_AT):
                    expected[key] = meta["caption"]
        stats = {"count": PER_SHARD, "successes": PER_SHARD, "status_dict": {"success": PER_SHARD}}
        (directory / f"{shard:05d}_stats.json").write_text(json.dumps(stats))
        (directory / f"{shard:05d}.parquet").write_bytes(b"PAR1" + b"\0" * 64 + b"PAR1")
    last = directory / f"{SHARDS - 1:05d}.tar"
    last.write_bytes(last.read_bytes()[:cut_offset])
    return expected
