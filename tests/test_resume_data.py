"""Exact resume of the data loaders: state after k batches -> batches k+1.. identical
(keys, pixels, MLM/ITM draws) to an uninterrupted run, on both CPU backends."""

from __future__ import annotations

import json

import pytest
import torch

from pixelbert_dist.data.loader import build_loader
from tests.data_helpers import BACKENDS, data_cfg, mixed_sizes, write_split

TENSORS = ("images", "image_sizes", "input_ids", "attention_mask", "mlm_labels", "itm_labels", "is_pad")


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    directory = tmp_path_factory.mktemp("resume") / "train"
    write_split(directory, mixed_sizes(19, seed=3), per_shard=5)
    return directory


def _loader(directory, backend, **kw):
    rank, world = kw.pop("rank", 0), kw.pop("world_size", 1)
    return build_loader(data_cfg(backend, hflip=True, **kw), directory, 3, rank=rank, world_size=world)


def _assert_same(got: list[dict], want: list[dict]) -> None:
    assert [b["keys"] for b in got] == [b["keys"] for b in want]
    for a, b in zip(got, want):
        for name in TENSORS:
            assert torch.equal(a[name], b[name]), name


def _two_epochs(loader) -> list[list[dict]]:
    out = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        out.append(list(loader))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_restore_continues_exactly(split, backend):
    reference = _two_epochs(_loader(split, backend, rank=1, world_size=2))
    assert len(reference[0]) == 4
    assert [b["keys"] for b in reference[0]] != [b["keys"] for b in reference[1]]

    loader = _loader(split, backend, rank=1, world_size=2)
    first = []
    for batch in loader:
        first.append(batch)
        if len(first) == 2:
            break
    state = json.loads(json.dumps(loader.state_dict()))  # must survive a JSON checkpoint
    assert state["epoch"] == 0
    assert state["batches_done"] == 2

    # The same object continues where it stopped ...
    _assert_same(first + list(loader), reference[0])
    # ... and so does a fresh one restored from the state, into the next epoch too.
    fresh = _loader(split, backend, rank=1, world_size=2)
    fresh.load_state_dict(state)
    fresh.set_epoch(0)  # same epoch: keeps the position
    _assert_same(first + list(fresh), reference[0])
    fresh.set_epoch(1)
    _assert_same(list(fresh), reference[1])


def test_state_is_backend_independent(split):
    """A DALI run resumed with PIL (e.g. on a node without DALI) gets the same samples."""
    dali = _loader(split, "dali")
    dali.set_epoch(3)
    full = list(dali)
    dali.batches_done = 0
    it = iter(dali)
    next(it)
    state = dali.state_dict()
    pil = _loader(split, "pil")
    pil.load_state_dict(state)
    rest = list(pil)
    assert [b["keys"] for b in rest] == [b["keys"] for b in full[1:]]
    for a, b in zip(rest, full[1:]):
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["mlm_labels"], b["mlm_labels"])


def test_end_of_epoch_state_and_restart(split):
    loader = _loader(split, "dali")
    epoch0 = list(loader)
    state = loader.state_dict()
    assert state["batches_done"] == len(loader) == len(epoch0)
    _assert_same(list(loader), epoch0)  # a finished epoch starts over
    restored = _loader(split, "dali")
    restored.load_state_dict(state)
    restored.set_epoch(1)
    assert restored.batches_done == 0
    assert len(list(restored)) == len(loader)


@pytest.mark.slow
def test_rank0_state_restores_other_ranks_and_mismatch_is_refused(split):
    rank0 = _loader(split, "pil", world_size=2)
    next(iter(rank0))
    state = rank0.state_dict()  # DeepSpeed keeps rank 0's client_state only
    rank1 = _loader(split, "pil", rank=1, world_size=2)
    rank1.load_state_dict(state)
    want = list(_loader(split, "pil", rank=1, world_size=2))[1:]
    assert [b["keys"] for b in rank1] == [b["keys"] for b in want]
    with pytest.raises(ValueError, match="world_size"):
        _loader(split, "pil", world_size=3).load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        _loader(split, "pil").load_state_dict({"epoch": 0})
