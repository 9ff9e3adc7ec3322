"""Damaged samples at training time, on the pil and dali backends: a JPEG changed inside
a finished shard (same size), a shard truncated under a running loader, a JPEG that
does not decode. None stops the run, none reaches a batch: each is replaced by the
same stand-in on both backends and after a resume, counted, and named once."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from pixelbert_dist.data.loader import build_loader
from pixelbert_dist.data.readers.indexed import ShardIndex
from pixelbert_dist.data.format.shards import ShardWriter
from pixelbert_dist.data.format.index import ShardFormatError
from tests.data_helpers import BACKENDS, MEAN_TOL, data_cfg, make_jpeg, mixed_sizes, write_split

N, BATCH = 14, 4
UNDECODABLE = b"\xff\xd8" + b"this is not a JPEG stream " * 8 + b"\xff\xd9"


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    directory = tmp_path_factory.mktemp("clean") / "train"
    return directory, write_split(directory, mixed_sizes(N, seed=2), per_shard=5)


def _damage_bytes(directory, sample: int, cut: bool = False) -> str:
    """Flip 64 bytes in the middle of a sample's JPEG (same size), or cut the tar there."""
    index = ShardIndex(directory)
    ref = index.samples[sample]
    tar = index.paths[ref.shard]
    data = bytearray(tar.read_bytes())
    middle = ref.jpg[0] + ref.jpg[1] // 2
    if cut:
        tar.write_bytes(bytes(data[:middle]))
    else:
        data[middle : middle + 64] = bytes(b ^ 0x5A for b in data[middle : middle + 64])
        tar.write_bytes(bytes(data))
    return f"{tar.name}:{ref.key}"


def _pixels_by_key(directory) -> dict:
    loader = build_loader(data_cfg("pil", num_workers=0), directory, BATCH, train=False)
    out = {}
    for batch in loader:
        for i, (key, (h, w)) in enumerate(zip(batch["keys"], batch["image_sizes"].tolist())):
            out[key] = batch["images"][i, :, :h, :w]
    return out


def _run(directory, backend, **kw) -> tuple:
    loader = build_loader(data_cfg(backend, **kw), directory, BATCH)
    batches = list(loader)
    return loader, batches


def _check_replaced(batches, loader, bad_key, reference, caplog, where):
    keys = [k for b in batches for k in b["keys"]]
    assert bad_key not in keys
    assert len(keys) == N
    assert loader.damaged == 1
    assert sum(b["damaged"] for b in batches) == 1
    named = [r for r in caplog.records if where in r.getMessage()]
    assert len(named) == 1, [r.getMessage() for r in caplog.records]
    for batch in batches:  # every row is a clean image of the key it claims
        for i, (key, (h, w)) in enumerate(zip(batch["keys"], batch["image_sizes"].tolist())):
            diff = (batch["images"][i, :, :h, :w] - reference[key]).abs().mean()
            assert diff < MEAN_TOL, (key, float(diff))  # garbage differs by > 0.3
    return keys


def test_changed_bytes_same_size_are_replaced_alike_and_resume_exactly(tmp_path, clean, caplog):
    directory = tmp_path / "train"
    keys = write_split(directory, mixed_sizes(N, seed=2), per_shard=5)
    reference = _pixels_by_key(clean[0])
    where = _damage_bytes(directory, 6)
    assert ShardIndex(directory).read(6).damage.startswith("checksum mismatch")
    seen = {}
    for backend in BACKENDS:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pixelbert_dist.data"):
            loader, batches = _run(directory, backend, shuffle=False)
        seen[backend] = _check_replaced(batches, loader, keys[6], reference, caplog, where)
    assert seen["dali"] == seen["pil"]
    # resume: the state after one batch continues with the same stand-in
    loader = build_loader(data_cfg("pil", hflip=True), directory, BATCH)
    full = list(loader)
    loader.batches_done = 0
    next(iter(loader))
    fresh = build_loader(data_cfg("pil", hflip=True), directory, BATCH)
    fresh.load_state_dict(json.loads(json.dumps(loader.state_dict())))
    rest = list(fresh)
    assert [b["keys"] for b in rest] == [b["keys"] for b in full[1:]]
    for a, b in zip(rest, full[1:]):
        assert torch.equal(a["images"], b["images"])
        assert torch.equal(a["input_ids"], b["input_ids"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_shard_truncated_under_a_running_loader(tmp_path, clean, backend, caplog):
    directory = tmp_path / "train"
    keys = write_split(directory, mixed_sizes(N, seed=2), per_shard=5)
    loader = build_loader(data_cfg(backend, shuffle=False), directory, BATCH)  # start-up checks pass
    where = _damage_bytes(directory, N - 1, cut=True)  # last sample of the last shard
    with caplog.at_level(logging.WARNING, logger="pixelbert_dist.data"):
        batches = list(loader)
    _check_replaced(batches, loader, keys[N - 1], _pixels_by_key(clean[0]), caplog, where)
    assert any("short read" in r.getMessage() for r in caplog.records)
    caplog.clear()
    restarted = build_loader(data_cfg(backend, shuffle=False), directory, BATCH)  # no per-shard stat at start-up
    with caplog.at_level(logging.WARNING, logger="pixelbert_dist.data"):
        again = list(restarted)
    _check_replaced(again, restarted, keys[N - 1], _pixels_by_key(clean[0]), caplog, where)


def test_undecodable_jpeg_is_replaced_alike(tmp_path, caplog):
    directory = tmp_path / "train"
    sizes = mixed_sizes(N, seed=2)
    with ShardWriter(directory, "train", samples_per_shard=5) as writer:
        for i, (height, width) in enumerate(sizes):
            key = f"img{i:04d}"
            writer.write(
                key,
                UNDECODABLE if i == 9 else make_jpeg(height, width, i),
                {"key": key, "captions": [f"caption {i}"], "width": width, "height": height},
            )
    assert ShardIndex(directory).read(9).damage is None  # intact bytes: only decoding tells
    with pytest.raises(OSError):
        Image.open(io.BytesIO(UNDECODABLE))
    seen = {}
    for backend in BACKENDS:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pixelbert_dist.data"):
            loader, batches = _run(directory, backend, shuffle=False)
        seen[backend] = [k for b in batches for k in b["keys"]]
        assert "img0009" not in seen[backend]
        assert loader.damaged == 1
        assert (
            sum(
                "train-000001.tar:img0009" in r.getMessage() and "undecodable" in r.getMessage() for r in caplog.records
            )
            == 1
        )
        assert all(np.isfinite(b["images"].numpy()).all() for b in batches)
    assert seen["dali"] == seen["pil"]


def test_random_access_names_a_damaged_sample(tmp_path):
    directory = tmp_path / "train"
    write_split(directory, mixed_sizes(6), per_shard=3)
    where = _damage_bytes(directory, 4)
    with pytest.raises(ShardFormatError, match=where.split(":")[1] + r".jpg is damaged.*checksum"):
        ShardIndex(directory).jpeg(4)


def test_webdataset_reader_replaces_changed_bytes_in_its_batch(tmp_path, clean, caplog):
    """dali_reader='webdataset': DALI reads the bytes itself; the CRC check after it swaps
    the damaged row for the next sound row of the same batch, and resume stays exact."""
    directory = tmp_path / "train"
    keys = write_split(directory, mixed_sizes(N, seed=2), per_shard=5)
    where = _damage_bytes(directory, 3)
    reference = _pixels_by_key(clean[0])
    cfg = dict(dali_reader="webdataset", shuffle=False)
    with caplog.at_level(logging.WARNING, logger="pixelbert_dist.data"):
        loader, batches = _run(directory, "dali", **cfg)
    seen = [k for b in batches for k in b["keys"]]
    assert keys[3] not in seen
    assert seen.count(keys[0]) == 2
    assert len(seen) == len(keys) + 2
    assert loader.damaged == 1
    assert sum(b["damaged"] for b in batches) == 1
    assert sum(where in r.getMessage() for r in caplog.records) == 1
    for batch in batches:
        for i, (key, (h, w)) in enumerate(zip(batch["keys"], batch["image_sizes"].tolist())):
            assert (batch["images"][i, :, :h, :w] - reference[key]).abs().mean() < MEAN_TOL, key
    first = build_loader(data_cfg("dali", **cfg), directory, BATCH)
    next(iter(first))
    fresh = build_loader(data_cfg("dali", **cfg), directory, BATCH)
    fresh.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert [b["keys"] for b in fresh] == [b["keys"] for b in batches[1:]]
