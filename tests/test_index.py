"""The per-shard index sidecars: written by the shard writer, listed in the manifest,
read lazily; old splits get theirs from `make_shards.py index`; the lazy epoch plan
equals a list-of-objects plan of the same rules, sample for sample."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from pixelbert_dist.data.format import index as shard_index
from pixelbert_dist.data.loader import build_loader
from pixelbert_dist.data.readers.plan import EpochPlan, epoch_plan
from pixelbert_dist.data.readers.indexed import ShardIndex
from pixelbert_dist.data.format.shards import read_manifest
from pixelbert_dist.data.format.index import ShardFormatError
from tests.data_helpers import data_cfg, mixed_sizes, reference_shuffle, write_split

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    directory = tmp_path_factory.mktemp("index") / "train"
    sizes = mixed_sizes(17, seed=7)
    return directory, write_split(directory, sizes, per_shard=5), sizes


def test_sidecar_matches_the_tar(split):
    directory, keys, sizes = split
    manifest = read_manifest(directory)
    seen = []
    for info, path in zip(manifest.shards, manifest.shard_paths()):
        assert info.index == path.name[:-4] + ".idx.npy"
        assert info.size == path.stat().st_size
        columns = shard_index.load(directory / info.index)
        with tarfile.open(path) as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            jpgs, jsons = members[0::2], members[1::2]
            for row, (jpg, meta) in enumerate(zip(jpgs, jsons)):
                data = tar.extractfile(jpg).read()
                got = [int(v) for v in columns[:, row]]
                assert got[:4] == [jpg.offset_data // 512, jpg.size, meta.offset_data // 512, meta.size]
                assert got[6] == zlib.crc32(data)
                seen.append((jpg.name[:-4], got[5], got[4]))
    assert seen == [(k, h, w) for k, (h, w) in zip(keys, sizes)]


def test_index_is_read_lazily(split):
    directory, keys, _ = split
    loader = build_loader(data_cfg("pil", num_workers=0), directory, 4)
    assert isinstance(loader.plan(), EpochPlan)
    assert loader.plan().indices.dtype == np.int64
    assert not loader.index._maps, "nothing read at start-up"
    assert not loader.index._fds, "nothing read at start-up"
    batch = next(iter(loader))
    assert len(loader.index._maps) <= len(batch["keys"])
    assert [loader.index.samples[i].key for i in range(len(keys))] == keys


def _strip_index(directory: Path) -> None:
    """Make the split look like one written before index sidecars existed."""
    manifest = json.loads((directory / "manifest.json").read_text())
    for shard in manifest["shards"]:
        (directory / shard.pop("index")).unlink()
        shard.pop("size")
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_old_split_fails_clearly_then_index_command_fixes_it(tmp_path, split):
    directory = tmp_path / "old"
    write_split(directory, mixed_sizes(9, seed=1), per_shard=4)
    reference = [b["keys"] for b in build_loader(data_cfg("pil", num_workers=0, bucketing=True), directory, 3)]
    _strip_index(directory)
    with pytest.raises(ShardFormatError, match=r"no index.*make_shards.py index .*old"):
        build_loader(data_cfg("pil", num_workers=0), directory, 3)
    run = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "make_shards.py"), "index", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "3 shard index(es) written" in run.stdout
    loader = build_loader(data_cfg("pil", num_workers=0, bucketing=True), directory, 3)
    assert [b["keys"] for b in loader] == reference
    again = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "make_shards.py"), "index", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "0 shard index(es) written" in again.stdout


def test_stale_index_is_named(tmp_path):
    directory = tmp_path / "stale"
    write_split(directory, mixed_sizes(6), per_shard=3)
    first = read_manifest(directory).shards[0]
    np.save(directory / first.index, np.zeros((7, 2), dtype=np.uint32))
    loader = build_loader(data_cfg("pil", num_workers=0, shuffle=False), directory, 2)
    with pytest.raises(ShardFormatError, match=r"2 rows.*3 samples.*index .*--force"):
        list(loader)


def _reference_plan(n, *, epoch, seed, rank, world_size, batch_size, shuffle, drop_last, aspect, window):
    """The plan as list-of-objects code computes it from the module docstring's rules:
    the whole epoch order at once (pure-Python Feistel), every window in one pass."""
    order = reference_shuffle(n, seed, epoch) if shuffle else list(range(n))
    total = n // (world_size * batch_size) * world_size * batch_size if drop_last else -(-n // world_size) * world_size
    slots = [(int(order[i % n]), i >= n) for i in range(rank, total, world_size)]
    if aspect is None:
        return [slots[i : i + batch_size] for i in range(0, len(slots), batch_size)]
    out, step = [], window * batch_size
    for w, start in enumerate(range(0, len(slots), step)):
        brng = np.random.default_rng(np.random.SeedSequence([seed, epoch, rank, 1, w])) if shuffle else None
        chunk = sorted(slots[start : start + step], key=lambda s: float(aspect[s[0]]))
        cut = [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        full = [b for b in cut if len(b) == batch_size]
        if brng is not None:
            full = [full[i] for i in brng.permutation(len(full))]
        out.extend(full + [b for b in cut if len(b) < batch_size])
    return out


@pytest.mark.parametrize("bucketing", [False, True])
def test_lazy_plan_equals_a_list_of_objects_plan(bucketing):
    aspect = np.random.default_rng(3).uniform(0.5, 2.0, 103).round(1) if bucketing else None
    for n, world, batch, shuffle, drop in [
        (103, 4, 5, True, False),
        (103, 3, 4, True, True),
        (103, 2, 7, False, False),
        (9, 4, 3, True, False),
    ]:
        for rank in range(world):
            kw = dict(epoch=2, seed=5, rank=rank, world_size=world, batch_size=batch, shuffle=shuffle, drop_last=drop)
            got = epoch_plan(n, aspect=(lambda idx: aspect[idx]) if bucketing else None, bucket_window=3, **kw)
            want = _reference_plan(n, aspect=aspect, window=3, **kw)
            assert [[(p.index, p.is_pad) for p in b] for b in got] == want


def test_shard_index_reads_one_shard_per_sample(split):
    directory, keys, _ = split
    index = ShardIndex(directory)
    sample = index.read(12)
    assert sample.key == keys[12]
    assert sample.damage is None
    assert index.meta(12)["key"] == keys[12]
    assert list(index._maps) == [index.locate(12)[0]]
