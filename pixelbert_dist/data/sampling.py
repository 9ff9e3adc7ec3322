"""Which samples each rank reads, in which order and batches, for every epoch.

Every backend (DALI, nvjpeg, PIL) draws its batches from ``epoch_plan`` and reads the
bytes through ``ShardIndex``, so they see the same samples in the same order, and the
loader state is just ``(epoch, batches consumed)``: exact resume needs no backend state.

The epoch plan (``N`` samples, ``W`` ranks, batch ``B``):

* order: a permutation of the N samples seeded by ``(seed, epoch)`` (identity without
  shuffling), the same on every rank, so one epoch covers every sample;
* default (``drop_last=False``, always in evaluation): the order is extended to
  ``ceil(N / W) * W`` slots by wrapping around to its start, as torch's
  DistributedSampler does. The at most ``W - 1`` extra slots are repeats flagged
  ``is_pad=True``: training uses them (a repeat is harmless), evaluation must exclude
  them. No sample is ever dropped, and every rank gets the same number of batches of the
  same sizes (the last batch may be partial), so collectives never hang;
* ``drop_last=True`` (training only): the order is cut to a multiple of ``W * B``; up
  to ``W * B - 1`` samples are skipped in that epoch, different ones each epoch;
* rank ``r`` takes slots ``r, r + W, r + 2W, ...`` and cuts them into batches of B;
* bucketing: within windows of ``bucket_window`` batches, the rank's samples are sorted
  by aspect ratio before cutting, and the window's full batches are then shuffled, so
  batches hold similar shapes (less padding) while the data order stays random.

The plan is held in numpy arrays (``EpochPlan``: this rank's sample indices and pad
flags in batch order), never as one Python object per sample: at 10^6 samples over 8
ranks it is 1 MB. ``ShardIndex`` (random access through the index sidecars) lives in
``samples`` and is re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from pixelbert_dist.data.samples import SampleRef, ShardIndex  # noqa: F401  (re-export)


@dataclass(frozen=True)
class PlannedSample:
    index: int  # into ShardIndex
    is_pad: bool  # a wrap-around repeat (see the module docstring)


class PlanBatch(Sequence):
    """One batch of the plan: numpy views, PlannedSample made on demand."""

    def __init__(self, indices: np.ndarray, is_pad: np.ndarray):
        self.indices, self.is_pad = indices, is_pad

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return PlannedSample(int(self.indices[i]), bool(self.is_pad[i]))

    def __iter__(self) -> Iterator[PlannedSample]:
        return (PlannedSample(int(i), bool(p)) for i, p in zip(self.indices, self.is_pad))


class EpochPlan(Sequence):
    """This rank's batches: ``indices``/``is_pad`` in batch order, cut at ``bounds``."""

    def __init__(self, indices: np.ndarray, is_pad: np.ndarray, bounds: np.ndarray):
        self.indices, self.is_pad, self.bounds = indices, is_pad, bounds

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(f"batch {k} outside the plan's {len(self)}")
        lo, hi = self.bounds[k], self.bounds[k + 1]
        return PlanBatch(self.indices[lo:hi], self.is_pad[lo:hi])


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(w) for w in words]))


def _epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    return _rng(seed, epoch).permutation(n) if shuffle else np.arange(n)


def _bucketed(
    indices: np.ndarray,
    is_pad: np.ndarray,
    ratios: np.ndarray,
    batch_size: int,
    window: int,
    rng: np.random.Generator | None,
) -> EpochPlan:
    """Sort each window by aspect ratio, cut into batches, shuffle the full batches."""
    order_parts, bounds = [], [0]
    step = window * batch_size
    for start in range(0, len(indices), step):
        chunk = start + np.argsort(ratios[start : start + step], kind="stable")
        cut = [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        full = [b for b in cut if len(b) == batch_size]
        if rng is not None:
            full = [full[i] for i in rng.permutation(len(full))]
        for b in full + [b for b in cut if len(b) < batch_size]:
            order_parts.append(b)
            bounds.append(bounds[-1] + len(b))
    order = np.concatenate(order_parts) if order_parts else np.zeros(0, dtype=np.int64)
    return EpochPlan(indices[order], is_pad[order], np.asarray(bounds, dtype=np.int64))


def epoch_plan(
    num_samples: int,
    *,
    epoch: int,
    seed: int,
    rank: int,
    world_size: int,
    batch_size: int,
    shuffle: bool = True,
    drop_last: bool = False,
    aspect: np.ndarray | Callable[[np.ndarray], np.ndarray] | None = None,
    bucket_window: int = 16,
) -> EpochPlan:
    """This rank's batches for ``epoch`` (see the module docstring for the rules).
    ``aspect``: width/height per sample index, or a function of an index array (what
    ``ShardIndex.aspect_of`` is), for bucketing."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if batch_size < 1 or num_samples < 1:
        raise ValueError(f"need batch_size >= 1 and samples >= 1 (got {batch_size}, {num_samples})")
    order = _epoch_order(num_samples, seed, epoch, shuffle)
    if drop_last:
        total = num_samples // (world_size * batch_size) * world_size * batch_size
        if total == 0:
            raise ValueError(
                f"drop_last with {num_samples} samples < world_size x batch_size "
                f"= {world_size * batch_size} leaves no batch"
            )
    else:
        total = -(-num_samples // world_size) * world_size
    positions = np.arange(rank, total, world_size, dtype=np.int64)
    indices = order[positions % num_samples].astype(np.int64)
    del order
    is_pad = positions >= num_samples
    if aspect is not None:
        ratios = aspect(indices) if callable(aspect) else np.asarray(aspect)[indices]
        rng = _rng(seed, epoch, rank, 1) if shuffle else None
        return _bucketed(indices, is_pad, np.asarray(ratios, dtype=np.float64), batch_size, bucket_window, rng)
    bounds = np.append(np.arange(0, len(indices), batch_size), len(indices))
    return EpochPlan(indices, is_pad, bounds)
