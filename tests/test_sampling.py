"""The lazy epoch plan: the keyed bijection behind the epoch order is a permutation that
matches a pure-Python reference, changes with seed and epoch and spreads every sample
evenly; the plan's batches are computed where asked (same result from any starting
batch, a plan over 10^9 samples in a few hundred kB); a loader state saved under another
order is refused mid-epoch."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from pixelbert_dist.data.loader import build_loader
from pixelbert_dist.data.readers.indexed import ShardIndex
from pixelbert_dist.data.readers.plan import EpochShuffle, Replan, ShardWindowOrder, epoch_plan, shard_window_order
from pixelbert_dist.train.resume import replan_data_state
from tests.data_helpers import data_cfg, mixed_sizes, reference_shuffle, write_split


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 65, 1000, 4097, 100_000, 262_145])
def test_shuffle_is_a_permutation(n):
    order = EpochShuffle(n, seed=11, epoch=2)(np.arange(n))
    assert order.dtype == np.int64
    assert np.array_equal(np.sort(order), np.arange(n))
    picked = np.array([n - 1, 0, n // 2, n - 1])
    assert np.array_equal(EpochShuffle(n, seed=11, epoch=2)(picked), order[picked]), "evaluated where asked"


@pytest.mark.parametrize("n", [1, 5, 70, 1000])
def test_shuffle_equals_the_pure_python_reference(n):
    assert EpochShuffle(n, seed=4, epoch=9)(np.arange(n)).tolist() == reference_shuffle(n, 4, 9)


def test_shuffle_differs_per_seed_and_epoch_and_refuses_outside():
    orders = {(s, e): tuple(EpochShuffle(1000, s, e)(np.arange(1000))) for s in (0, 1, 2) for e in (0, 1, 2)}
    assert len(set(orders.values())) == len(orders)
    assert orders[(1, 2)] == tuple(EpochShuffle(1000, 1, 2)(np.arange(1000)))
    with pytest.raises(IndexError, match=r"\[0, 1000\)"):
        EpochShuffle(1000, 0, 0)(np.array([1000]))
    with pytest.raises(ValueError, match="n >= 1"):
        EpochShuffle(0, 0, 0)


# chi2.isf(1e-4 / n, n - 1) for the per-element tests (Bonferroni over the n elements)
# and chi2.isf(1e-4, n * (n - 1) - 1) for the pair test, from scipy.stats.
CHI2_LIMITS = {3: (20.62, 25.74), 10: (39.34, 147.35)}


@pytest.mark.slow
@pytest.mark.parametrize("n", [3, 10])
def test_shuffle_spreads_every_sample_evenly_over_seeds(n):
    seeds = 1000
    where = np.zeros((n, n))  # where[i, p]: seeds that put sample i at slot p
    pairs = np.zeros((n, n))  # pairs[a, b]: seeds whose slots 0 and 1 hold a and b
    for seed in range(seeds):
        order = EpochShuffle(n, seed, epoch=3)(np.arange(n))
        where[order, np.arange(n)] += 1
        pairs[order[0], order[1]] += 1
    expected = seeds / n
    per_sample = ((where - expected) ** 2 / expected).sum(axis=1)
    off_diagonal = ~np.eye(n, dtype=bool)
    expected_pair = seeds / (n * (n - 1))
    pair_stat = ((pairs[off_diagonal] - expected_pair) ** 2 / expected_pair).sum()
    assert per_sample.max() < CHI2_LIMITS[n][0], where
    assert pair_stat < CHI2_LIMITS[n][1], pairs
    assert not pairs[~off_diagonal].any()


def test_large_order_has_no_visible_structure():
    n = 100_000
    order = EpochShuffle(n, seed=0, epoch=0)(np.arange(n))
    assert abs(np.corrcoef(np.arange(n), order)[0, 1]) < 0.01  # ~N(0, 1/sqrt(n)) = 0.003
    assert abs(np.corrcoef(order[:-1], order[1:])[0, 1]) < 0.01
    assert (order == np.arange(n)).sum() < 10  # fixed points: Poisson(1)
    halves = np.bincount(order[: n // 2] * 10 // n, minlength=10)  # first half of the epoch
    assert np.all(np.abs(halves - n // 20) < 5 * np.sqrt(n / 20))


def _plans(n, world, batch, **kw):
    return [epoch_plan(n, epoch=1, seed=7, rank=r, world_size=world, batch_size=batch, **kw) for r in range(world)]


def _ratios(idx):
    return 0.5 + (np.asarray(idx) * 2654435761 % 1000) / 500


@pytest.mark.parametrize("bucketing", [False, True])
@pytest.mark.parametrize("n, world, batch", [(1, 2, 4), (7, 3, 2), (1000, 8, 16), (4097, 3, 32)])
def test_union_of_all_ranks_is_every_sample_once_plus_pads(n, world, batch, bucketing):
    plans = _plans(n, world, batch, aspect=_ratios if bucketing else None, bucket_window=4)
    indices = np.concatenate([p.indices for p in plans])
    is_pad = np.concatenate([p.is_pad for p in plans])
    assert np.array_equal(np.sort(indices[~is_pad]), np.arange(n))
    assert is_pad.sum() == -(-n // world) * world - n
    assert len({tuple(len(b) for b in p) for p in plans}) == 1, "every rank the same batch sizes"
    dropped = _plans(n, world, batch, drop_last=True) if n >= world * batch else []
    for plan in dropped:
        assert all(len(b) == batch for b in plan) and not plan.is_pad.any()
    if dropped:
        kept = np.concatenate([p.indices for p in dropped])
        assert len(np.unique(kept)) == len(kept) == n // (world * batch) * world * batch


def test_bucketing_only_reorders_inside_windows():
    kw = dict(epoch=0, seed=3, rank=1, world_size=4, batch_size=8)
    plain = epoch_plan(5000, **kw)
    bucketed = epoch_plan(5000, aspect=_ratios, bucket_window=5, **kw)
    assert len(plain) == len(bucketed) == 157
    for w in range(0, 157, 5):
        window = slice(w, min(w + 5, 157))
        assert sorted(np.concatenate([b.indices for b in bucketed[window]])) == sorted(
            np.concatenate([b.indices for b in plain[window]])
        )
    spread = [np.ptp(_ratios(b.indices)) for b in bucketed[:-1]]
    assert np.mean(spread) < 0.3 * np.mean([np.ptp(_ratios(b.indices)) for b in plain[:-1]])
    assert len(bucketed[-1]) == 5000 // 4 % 8 and len(bucketed[-2]) == 8, "the partial batch stays last"


def test_any_batch_read_first_equals_the_epoch_read_in_order():
    kw = dict(epoch=2, seed=5, rank=2, world_size=3, batch_size=6, aspect=_ratios, bucket_window=3)
    in_order = [b.indices.tolist() for b in epoch_plan(2000, **kw)]
    for k in (0, 1, 5, 57, len(in_order) - 1):
        assert epoch_plan(2000, **kw)[k].indices.tolist() == in_order[k]
    plan = epoch_plan(2000, **kw)
    jumping = [plan[k].indices.tolist() for k in (40, 2, 41, 3, 80, 2, 40)]
    assert jumping == [in_order[k] for k in (40, 2, 41, 3, 80, 2, 40)]
    assert plan[-1].indices.tolist() == in_order[-1]
    with pytest.raises(IndexError, match="outside the plan's"):
        plan[len(in_order)]


def test_a_plan_over_a_billion_samples_holds_no_per_sample_memory():
    tracemalloc.start()
    try:
        np.arange(2_000_000)  # the instrument sees numpy's buffers: 16 MB here
        assert tracemalloc.get_traced_memory()[1] > 15e6
        tracemalloc.reset_peak()
        plan = epoch_plan(
            10**9, epoch=3, seed=1, rank=5, world_size=8, batch_size=256, aspect=_ratios, bucket_window=16
        )
        middle, last = plan[len(plan) // 2], plan[len(plan) - 1]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(plan) == -(-(10**9 // 8) // 256)
    assert len(middle) == 256 and not middle.is_pad.any()
    assert len(last) == 10**9 // 8 % 256
    assert ((middle.indices >= 0) & (middle.indices < 10**9)).all()
    assert peak < 2e6, f"{peak / 1e6:.1f} MB traced building the plan and reading two batches"


@pytest.mark.slow
def test_a_state_from_another_epoch_order_is_refused_mid_epoch(tmp_path):
    write_split(tmp_path / "s", mixed_sizes(12), per_shard=6)
    loader = build_loader(data_cfg("pil", num_workers=0), tmp_path / "s", 2)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    assert state["plan_order"] == shard_window_order(16)  # training: the shard-window order
    old = {k: v for k, v in state.items() if k != "plan_order"}  # saved before the order had a name
    fresh = build_loader(data_cfg("pil", num_workers=0), tmp_path / "s", 2)
    with pytest.raises(ValueError, match=r"plan_order.*None.*feistel.*batch 1 of epoch 0"):
        fresh.load_state_dict(old)
    assert (fresh.epoch, fresh.batches_done) == (0, 0), "a refused state changes nothing"
    fresh.load_state_dict({**old, "epoch": 1, "batches_done": 0})  # an epoch boundary: nothing to replay
    assert (fresh.epoch, fresh.batches_done) == (1, 0)
    fresh.load_state_dict(state)
    assert [b["keys"] for b in fresh] == [b["keys"] for b in it]


SHARDS = np.array([50, 30, 0, 70, 20, 40, 60, 10, 25, 45, 33, 7])


def _shard_of(indices):
    return np.searchsorted(np.cumsum(SHARDS), indices, side="right")


def test_shard_window_order_is_a_permutation_read_in_runs_of_shards():
    n = int(SHARDS.sum())
    order = ShardWindowOrder(SHARDS, seed=5, epoch=1, window=3)(np.arange(n))
    assert np.array_equal(np.sort(order), np.arange(n))
    shards = _shard_of(order)
    switches = np.count_nonzero(np.diff(shards) != 0)
    assert len(set(shards[:100].tolist())) <= 3 + 1, "100 consecutive slots span about one window of shards"
    assert switches > 20, "samples are shuffled within a window, not read shard after shard"
    again = ShardWindowOrder(SHARDS, seed=5, epoch=2, window=3)(np.arange(n))
    assert not np.array_equal(order, again)


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("worlds", [(4, 3), (2, 5), (3, 1, 2)])
def test_a_world_size_change_mid_epoch_reads_every_sample_once(worlds, drop_last):
    """Ranks read blocks of the shard-window order; a re-plan continues over what each
    earlier rank left of its block (``Replan``), through any number of changes."""
    n, batch, replans, read = int(SHARDS.sum()), 6, [], []
    for world in worlds[:-1]:
        kw = dict(epoch=1, seed=3, world_size=world, batch_size=batch, shard_counts=SHARDS, shard_window=3)
        plans = [epoch_plan(n, rank=r, replans=replans, **kw) for r in range(world)]
        done = 3 * batch
        read += [p.indices[:done][~p.is_pad[:done]] for p in plans]
        replans = [*replans, Replan(world, plans[0].per_rank, done)]
    kw = dict(epoch=1, seed=3, world_size=worlds[-1], batch_size=batch, shard_counts=SHARDS, shard_window=3)
    plans = [epoch_plan(n, rank=r, replans=replans, drop_last=drop_last, **kw) for r in range(worlds[-1])]
    read += [p.indices[~p.is_pad] for p in plans]
    read = np.concatenate(read)
    assert len(read) == len(np.unique(read)), "no sample read twice"
    assert len(read) > n - worlds[-1] * batch if drop_last else len(read) == n


@pytest.mark.slow
def test_a_loader_state_replanned_to_another_world_size_continues_the_epoch(tmp_path):
    write_split(tmp_path / "s", mixed_sizes(60), per_shard=7)
    cfg = data_cfg("pil", num_workers=0, shard_window=2)
    loaders = [build_loader(cfg, tmp_path / "s", 3, rank=r, world_size=2) for r in range(2)]
    seen = []
    for loader in loaders:
        batches = iter(loader)
        seen += [k for _, b in zip(range(4), batches) for k in b["keys"]]
    saved = loaders[0].state_dict()
    fresh = build_loader(cfg, tmp_path / "s", 4, rank=0, world_size=1)
    fresh.load_state_dict(replan_data_state(saved, fresh.state_dict()))
    rest = [k for b in fresh for k in b["keys"]]
    assert sorted(seen + rest) == sorted(f"{k}" for k in _all_keys(tmp_path / "s"))


def _all_keys(directory):
    index = ShardIndex(directory)
    return [index.ref(i).key for i in range(len(index))]
