"""data.dali_reader='webdataset': DALI's own reader over real shards, on CPU.

Ranks partition the epoch (repeats flagged), pixels agree with the external DALI mode
and with PIL by key, hflip swaps the caption with the pixels, and a loader restored
from a JSON round trip of its state (DALI pipeline checkpoint inside) continues exactly,
on this rank and on another one.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from pixelbert_dist.data.config import DataConfig
from pixelbert_dist.data.readers.dali_wds import batches_per_epoch, index_dir, shard_bounds
from pixelbert_dist.data.decode.images import padded_batch_size, resized_size, swap_left_right
from pixelbert_dist.data.loader import build_loader
from tests.data_helpers import MAX, MEAN_TOL, SHORTER, data_cfg, mixed_sizes, write_split

N = 22
TENSORS = ("images", "image_sizes", "input_ids", "attention_mask", "mlm_labels", "itm_labels", "is_pad")


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    directory = tmp_path_factory.mktemp("wds") / "train"
    sizes = mixed_sizes(N, seed=5)
    return directory, write_split(directory, sizes, per_shard=6), sizes


def _wds(directory, batch_size=4, rank=0, world_size=1, train=True, **kw):
    return build_loader(
        data_cfg("dali", dali_reader="webdataset", **kw),
        directory,
        batch_size,
        rank=rank,
        world_size=world_size,
        train=train,
    )


def _by_key(batches) -> dict:
    """key -> valid CHW pixels of its first non-pad row."""
    out = {}
    for batch in batches:
        for i, (key, pad) in enumerate(zip(batch["keys"], batch["is_pad"].tolist())):
            h, w = batch["image_sizes"][i].tolist()
            if not pad:
                out.setdefault(key, batch["images"][i, :, :h, :w])
    return out


def _assert_same(got: list[dict], want: list[dict]) -> None:
    assert [b["keys"] for b in got] == [b["keys"] for b in want]
    for a, b in zip(got, want):
        assert a["captions"] == b["captions"]
        for name in TENSORS:
            assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("batch_size", [4, 7])
def test_ranks_partition_the_epoch_and_flag_repeats(split, batch_size):
    """batch 7 over 3 ranks: shards of 7, 7, 8 samples -> 2 batches on every rank, the
    short shards' second batch made only of repeats."""
    directory, keys, _ = split
    world, orders = 3, {}
    n_batches = batches_per_epoch(N, world, batch_size, drop_last=False)
    for epoch in (0, 1):
        seen = []
        for rank in range(world):
            loader = _wds(directory, batch_size, rank=rank, world_size=world)
            loader.set_epoch(epoch)
            batches = list(loader)
            assert len(batches) == len(loader) == n_batches
            assert all(len(b["keys"]) == batch_size for b in batches)
            begin, end = shard_bounds(N, loader.shard(), world)
            rows = [(k, bool(p)) for b in batches for k, p in zip(b["keys"], b["is_pad"])]
            real = [k for k, pad in rows if not pad]
            assert sorted(real) == keys[begin:end]  # DALI's contiguous shard
            assert {k for k, pad in rows if pad} <= set(real)  # repeats of its own samples
            seen += real
        assert sorted(seen) == keys  # every sample exactly once
        orders[epoch] = seen
    assert orders[0] != orders[1]  # shards rotate, order reshuffles
    if batch_size == 7:
        assert n_batches == 2
        assert shard_bounds(N, 0, world) == (0, 7)
    else:  # drop_last: floor(floor(22 / 3) / 4) = 1 full batch per rank, no repeat
        dropped = [list(_wds(directory, batch_size, rank=r, world_size=world, drop_last=True)) for r in range(world)]
        rows = [k for batches in dropped for b in batches for k in b["keys"]]
        assert [len(batches) for batches in dropped] == [1] * world
        assert len(set(rows)) == len(rows) == world * batch_size
        assert not any(b["is_pad"].any() for batches in dropped for b in batches)


def test_eval_pixels_match_external_dali_and_pil(split):
    directory, keys, sizes = split
    batches = list(_wds(directory, 5, train=False))
    assert [k for b in batches for k, p in zip(b["keys"], b["is_pad"]) if not p] == keys
    size_of = dict(zip(keys, sizes))
    for batch in batches:
        images, hw = batch["images"], batch["image_sizes"]
        assert images.dtype == torch.float32
        assert tuple(images.shape[2:]) == padded_batch_size(hw)
        assert (batch["mlm_labels"] == -100).all()
        assert (batch["itm_labels"] == 1).all()
        for i, key in enumerate(batch["keys"]):
            h, w = hw[i].tolist()
            assert (h, w) == resized_size(*size_of[key], SHORTER, MAX)
            assert images[i, :, h:].abs().sum() == 0
            assert images[i, :, :, w:].abs().sum() == 0
    ours = _by_key(batches)
    external = _by_key(build_loader(data_cfg("dali"), directory, 5, train=False))
    pil = _by_key(build_loader(data_cfg("pil"), directory, 5, train=False))
    assert ours.keys() == external.keys() == pil.keys() == set(keys)
    for key in keys:
        assert torch.equal(ours[key], external[key]), key  # same decoder and ops
        assert (ours[key] - pil[key]).abs().mean() < MEAN_TOL, key


def test_hflip_mirrors_pixels_and_swaps_words(split):
    directory, _, _ = split
    plain = list(_wds(directory, 4, hflip=False))
    flipped = list(_wds(directory, 4, hflip=True))
    n_flipped = 0
    for a, b in zip(plain, flipped):
        assert a["keys"] == b["keys"]  # the flip op never moves the order
        for i, (h, w) in enumerate(a["image_sizes"].tolist()):
            x, y = a["images"][i, :, :h, :w], b["images"][i, :, :h, :w]
            mirrored = torch.allclose(x.flip(-1), y, atol=1e-5)
            assert torch.equal(x, y) != mirrored, a["keys"][i]
            assert b["captions"][i] == (swap_left_right(a["captions"][i]) if mirrored else a["captions"][i])
            n_flipped += mirrored
    assert 0 < n_flipped < sum(len(b["keys"]) for b in plain)


def _two_epochs(loader) -> list[list[dict]]:
    out = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        out.append(list(loader))
    return out


def test_restore_continues_exactly(split):
    """State after k batches, through JSON, into a fresh loader: batches k+1.. identical
    (keys, pixels, flips, MLM/ITM), then the next epoch too. The live pipeline had
    prefetched ahead when the checkpoint was taken."""
    directory, _, _ = split
    kw = dict(batch_size=3, world_size=2, hflip=True, prefetch=2)
    reference = _two_epochs(_wds(directory, rank=1, **kw))
    assert len(reference[0]) == 4
    assert reference[0][-1]["is_pad"].any()
    for k in (1, 3):  # 3: the next batch holds repeats
        loader = _wds(directory, rank=1, **kw)
        first = []
        for batch in loader:
            first.append(batch)
            if len(first) == k:
                break
        state = json.loads(json.dumps(loader.state_dict()))
        assert state["batches_done"] == k
        assert state["dali_checkpoint"]
        fresh = _wds(directory, rank=1, **kw)
        fresh.load_state_dict(state)
        fresh.set_epoch(0)  # same epoch: keeps the position
        _assert_same(first + list(fresh), reference[0])
        fresh.set_epoch(1)
        _assert_same(list(fresh), reference[1])
        _assert_same(first + list(loader), reference[0])  # the same object continues too


def test_rank0_state_restores_rank1(split):
    """DeepSpeed keeps rank 0's client_state: the DALI checkpoint must not be rank-bound
    (same pipeline seed on every rank; shards of 11 and 11, and of 7/7/8)."""
    directory, _, _ = split
    for world, batch_size in ((2, 3), (3, 2)):
        rank0 = _wds(directory, batch_size, rank=0, world_size=world, hflip=True)
        rank0.set_epoch(1)
        it = iter(rank0)
        next(it), next(it)
        state = json.loads(json.dumps(rank0.state_dict()))
        last = _wds(directory, batch_size, rank=world - 1, world_size=world, hflip=True)
        last.set_epoch(1)
        want = list(last)[2:]
        restored = _wds(directory, batch_size, rank=world - 1, world_size=world, hflip=True)
        restored.load_state_dict(state)
        _assert_same(list(restored), want)


def test_states_of_other_modes_and_bad_configs_are_refused(split):
    directory, _, _ = split
    external = build_loader(data_cfg("dali"), directory, 4)
    next(iter(external))
    with pytest.raises(ValueError, match="another data.dali_reader"):
        _wds(directory).load_state_dict(external.state_dict())
    ours = _wds(directory)
    next(iter(ours))
    state = ours.state_dict()
    with pytest.raises(ValueError, match="version"):
        external.load_state_dict(state)
    with pytest.raises(ValueError, match="hflip"):
        _wds(directory, hflip=True).load_state_dict(state)
    with pytest.raises(ValueError, match="dali_checkpoint"):
        _wds(directory).load_state_dict({**state, "dali_checkpoint": None})
    with pytest.raises(ValueError, match="dali_checkpoint.*base64"):
        _wds(directory).load_state_dict({**state, "dali_checkpoint": "not base64!"})
    for bad, match in [
        (dict(dali_reader="native"), "data.dali_reader='native'"),
        (dict(backend="pil", dali_reader="webdataset"), "mode of data.backend"),
        (dict(dali_reader="webdataset", bucketing=True), "bucketing"),
    ]:
        with pytest.raises(ValueError, match=match):
            DataConfig(**bad).validate()


def test_index_files_never_touch_a_read_only_shard_dir(tmp_path, capfd, monkeypatch):
    directory = tmp_path / "ro"
    keys = write_split(directory, mixed_sizes(5), per_shard=3)
    writable = list(_wds(directory, 2, train=False))
    assert index_dir(directory) == directory.resolve() / ".dali_index"
    (directory / ".dali_index").rename(tmp_path / "old_index")
    before = sorted(os.listdir(directory))
    # The tests run as root, which chmod cannot stop: deny write access the way a
    # read-only mount does, for this directory only.
    real_access = os.access
    monkeypatch.setattr(
        os,
        "access",
        lambda path, mode, **kw: (
            False if (mode & os.W_OK and str(path) == str(directory.resolve())) else real_access(path, mode)
        ),
    )
    loader = _wds(directory, 2, train=False)
    assert sorted(os.listdir(directory)) == before
    assert not str(index_dir(directory)).startswith(str(tmp_path))
    want = [k for b in writable for k, p in zip(b["keys"], b["is_pad"]) if not p]
    assert [k for b in loader for k, p in zip(b["keys"], b["is_pad"]) if not p] == want == keys
    text = (index_dir(directory) / "train-000000.tar.idx").read_text().splitlines()
    assert text[0] == "v1.2 3"
    assert text[1].startswith("jpg 512 ")
    assert "Index file not provided" not in capfd.readouterr().err
