"""Which samples each rank reads, in which order and batches, for every epoch.

Every backend (DALI, nvjpeg, PIL) draws its batches from ``epoch_plan`` and reads the
bytes through ``ShardIndex``, so they see the same samples in the same order, and the
loader state is just ``(epoch, batches consumed)``: exact resume needs no backend state.

The epoch plan (``N`` samples, ``W`` ranks, batch ``B``):

* order: slot ``p`` of the epoch holds sample ``shuffle(p)``, a keyed pseudo-random
  bijection of ``[0, N)`` seeded by ``(seed, epoch)``, the same on every rank, so one
  epoch covers every sample once. Training over shards uses ``ShardWindowOrder``
  (shards shuffled, then samples shuffled within windows of ``shard_window`` shards) so
  that a rank reads shards in runs; without shard counts, one global ``EpochShuffle``;
  without shuffling, the identity;
* default (``drop_last=False``, always in evaluation): the order is extended to
  ``ceil(N / W) * W`` slots by wrapping around to its start (slot ``p >= N`` holds
  ``shuffle(p - N)``), as torch's DistributedSampler does. The at most ``W - 1`` extra
  slots are repeats flagged ``is_pad=True``: training uses them (a repeat is harmless),
  evaluation must exclude them. No sample is ever dropped, and every rank gets the same
  number of batches of the same sizes (the last batch may be partial), so collectives
  never hang;
* ``drop_last=True`` (training only): the order is cut to a multiple of ``W * B``; up
  to ``W * B - 1`` samples are skipped in that epoch, different ones each epoch;
* rank ``r`` takes the block of slots ``r * P ... (r + 1) * P - 1`` (``P`` slots per
  rank) of the shard-window order, else slots ``r, r + W, r + 2W, ...``, and cuts them
  into batches of B. A world-size change mid-epoch continues over the slots each earlier
  rank left in its block (``Replan``), so the epoch still reads every sample once;
* bucketing: within windows of ``bucket_window`` batches (window ``w`` holds the rank's
  batches ``w * bucket_window ...``), the rank's samples are sorted by aspect ratio
  (stable) before cutting, and the window's full batches are then shuffled by a
  generator seeded by ``(seed, epoch, rank, 1, w)``, so batches hold similar shapes (less
  padding) while the data order stays random. Only the last window can hold a partial
  batch; it stays last.

Nothing in a plan grows with N: batch ``k`` is computed when asked, from the slots it
needs (without bucketing) or from its window's slots (with bucketing: positions ->
sample indices -> aspect ratios -> sort -> shuffle of the full batches, the last two
windows cached). Start-up is O(1), resuming at batch ``k`` is O(window), and a plan over
10^9 samples holds a few kB. ``PLAN_ORDER`` names this order in the loader state, so a
state saved under another order is not resumed onto this one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np


PLAN_ORDER = "feistel8-splitmix64-pow2"  # the epoch order's name, kept in the loader state


def shard_window_order(window: int) -> str:
    """The name of the shard-window order (``ShardWindowOrder``) kept in the loader state."""
    return f"shardwindow{window}-{PLAN_ORDER}-block"


FEISTEL_ROUNDS = 8
MIN_BITS = 6  # a domain of at least 64: tiny sets mix as well as larger ones

_GOLDEN, _MIX1, _MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's output function over a uint64 array (arithmetic wraps mod 2^64)."""
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


class EpochShuffle:
    """A keyed pseudo-random bijection of ``[0, n)``, evaluated only where asked.

    A Feistel network over the ``2**b >= n`` values of ``b`` bits (halves of ``b // 2``
    and ``b - b // 2`` bits that trade places every round, an even number of rounds;
    round function splitmix64 of the right half xor a round key, keys from
    ``SeedSequence([seed, epoch])``) is a permutation of that domain for any keys;
    cycle-walking (apply it again while the value is ``>= n``) restricts it to a
    permutation of ``[0, n)``. The domain is under 2n (at least 64), so a value takes
    under two steps on average."""

    def __init__(self, n: int, seed: int, epoch: int, rounds: int = FEISTEL_ROUNDS, stream: tuple[int, ...] = ()):
        if n < 1:
            raise ValueError(f"EpochShuffle needs n >= 1 (got {n})")
        if rounds % 2:
            raise ValueError(f"EpochShuffle needs an even number of rounds (got {rounds})")
        self.n = n
        bits = max(MIN_BITS, (n - 1).bit_length())
        self.widths = (bits // 2, bits - bits // 2)  # (left, right) bits on entry
        words = [int(seed), int(epoch), *map(int, stream)]  # no stream: the keys of the global order
        self.keys = np.random.SeedSequence(words).generate_state(rounds, np.uint64)

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left_bits, right_bits = self.widths
        left, right = x >> np.uint64(right_bits), x & np.uint64((1 << right_bits) - 1)
        for key in self.keys:  # (L, R) -> (R, L ^ F(R)): the halves trade widths
            mask = np.uint64((1 << left_bits) - 1)
            left, right = right, left ^ (splitmix64(right ^ key) & mask)
            left_bits, right_bits = right_bits, left_bits
        return (left << np.uint64(right_bits)) | right

    def __call__(self, positions) -> np.ndarray:
        """The samples at the given positions (int64 array of the same shape)."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= self.n):
            raise IndexError(f"positions outside [0, {self.n})")
        out = self._feistel(positions.astype(np.uint64).ravel())
        walking = np.flatnonzero(out >= self.n)
        values = out[walking]
        while walking.size:
            values = self._feistel(values)
            landed = values < self.n
            out[walking[landed]] = values[landed]
            walking, values = walking[~landed], values[~landed]
        return out.astype(np.int64).reshape(positions.shape)


class ShardWindowOrder:
    """The training order that reads shards in runs: the shards in a keyed random order,
    cut into windows of ``window`` consecutive shards; each window's samples in a keyed
    random order of their own. Consecutive slots thus come from one window of shards (a
    batch mixes ``window`` shards) and a rank's block of slots touches few shards: opens
    per epoch grow with the shards, not the samples. O(shards) memory; a window's shuffle
    is made when a slot in it is asked for."""

    def __init__(self, counts: np.ndarray, seed: int, epoch: int, window: int):
        counts = np.asarray(counts, dtype=np.int64)
        self.n, self.seed, self.epoch = int(counts.sum()), seed, epoch
        permuted = EpochShuffle(len(counts), seed, epoch)(np.arange(len(counts)))
        self.first_sample = np.concatenate([[0], np.cumsum(counts)])[permuted]  # of each permuted shard
        self.first_slot = np.concatenate([[0], np.cumsum(counts[permuted])])  # the same, in slot space
        self.bounds = np.append(self.first_slot[: len(counts) : window], self.n)  # window w: [b[w], b[w+1])
        self._recent: tuple = ()  # the last two windows' shuffles

    def _shuffle(self, w: int) -> EpochShuffle:
        for entry in self._recent:
            if entry[0] == w:
                return entry[1]
        size = int(self.bounds[w + 1] - self.bounds[w])
        entry = (w, EpochShuffle(size, self.seed, self.epoch, stream=(2, w)))
        self._recent = (entry, *self._recent[:1])
        return entry[1]

    def __call__(self, positions) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        windows = np.searchsorted(self.bounds, positions, side="right") - 1
        out = np.empty_like(positions)
        for w in np.unique(windows):
            where = windows == w
            lo = self.bounds[w]
            slots = self._shuffle(int(w))(positions[where] - lo) + lo
            shard = np.searchsorted(self.first_slot, slots, side="right") - 1
            out[where] = self.first_sample[shard] + slots - self.first_slot[shard]
        return out


@dataclass(frozen=True)
class Replan:
    """What an earlier world size of this epoch left to read: each of its ``world_size``
    ranks had read the first ``done`` of its block of ``per_rank`` slots. The rest, block
    after block, is the domain of the plan that continues the epoch (exact: nothing read
    twice, nothing skipped, up to the bucketing window the caller rounded ``done`` to)."""

    world_size: int
    per_rank: int
    done: int

    @property
    def remaining(self) -> int:
        return self.world_size * (self.per_rank - self.done)

    def slot(self, q: np.ndarray) -> np.ndarray:
        """The earlier plan's slot of the continuing plan's slot ``q``."""
        block, offset = np.divmod(q, self.per_rank - self.done)
        return block * self.per_rank + self.done + offset


@dataclass(frozen=True)
class PlannedSample:
    index: int  # into ShardIndex
    is_pad: bool  # a wrap-around repeat (see the module docstring)


class PlanBatch(Sequence):
    """One batch of the plan: numpy arrays, PlannedSample made on demand."""

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


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(w) for w in words]))


class EpochPlan(Sequence):
    """This rank's batches for one epoch, each computed when asked (module docstring)."""

    def __init__(
        self,
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
        shard_counts: np.ndarray | None = None,
        shard_window: int = 16,
        replans: Sequence[Replan] = (),
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if batch_size < 1 or num_samples < 1 or bucket_window < 1:
            raise ValueError(
                f"need batch_size, samples and bucket_window >= 1 (got {batch_size}, {num_samples}, {bucket_window})"
            )
        self.replans = tuple(replans)
        self.blocks = shuffle and shard_counts is not None  # the shard-window order, read in blocks
        if self.replans and not self.blocks:
            raise ValueError("a re-planned epoch needs the shard-window order (shard_counts)")
        domain = self.replans[-1].remaining if self.replans else num_samples  # the slots left to read
        self.domain = domain
        if drop_last:
            total = domain // (world_size * batch_size) * world_size * batch_size
            if total == 0:
                raise ValueError(
                    f"drop_last with {domain} samples < world_size x batch_size "
                    f"= {world_size * batch_size} leaves no batch"
                )
        else:
            total = -(-domain // world_size) * world_size
        self.num_samples, self.epoch, self.seed, self.rank = num_samples, epoch, seed, rank
        self.world_size, self.batch_size, self.bucket_window = world_size, batch_size, bucket_window
        self.shuffle, self.aspect = shuffle, aspect
        self.per_rank = total // world_size  # the same on every rank
        if self.blocks:
            self.order = ShardWindowOrder(shard_counts, seed, epoch, shard_window)
        else:
            self.order = EpochShuffle(num_samples, seed, epoch) if shuffle else None
        self._recent: tuple = ()  # the last two windows: (w, indices, is_pad)

    def __len__(self) -> int:
        return -(-self.per_rank // self.batch_size)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        k = int(k)
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(f"batch {k} outside the plan's {len(self)}")
        if self.aspect is None:
            lo = k * self.batch_size
            return PlanBatch(*self._slots(lo, min(lo + self.batch_size, self.per_rank)))
        _, indices, is_pad = self._window(k // self.bucket_window)
        lo = k % self.bucket_window * self.batch_size
        return PlanBatch(indices[lo : lo + self.batch_size], is_pad[lo : lo + self.batch_size])

    @property
    def indices(self) -> np.ndarray:
        """Every batch's sample indices, concatenated: O(N / W) memory, for tests and
        tools over small sets; the loaders read batch by batch."""
        return np.concatenate([b.indices for b in self]).astype(np.int64, copy=False)

    @property
    def is_pad(self) -> np.ndarray:
        """Every batch's pad flags, concatenated (O(N / W), as ``indices``)."""
        return np.concatenate([b.is_pad for b in self])

    def _slots(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample indices and pad flags of this rank's slots ``lo .. hi - 1``: a block of
        the shard-window order (rank r: slots ``r * per_rank ...``), else every W-th slot."""
        steps = np.arange(lo, hi, dtype=np.int64)
        if self.blocks:
            positions = self.rank * self.per_rank + steps
        else:
            positions = self.rank + self.world_size * steps
        positions, is_pad = _wrap(positions, self.domain)
        for i in range(len(self.replans) - 1, -1, -1):  # back through each earlier world size
            below = self.replans[i - 1].remaining if i else self.num_samples
            positions, pad = _wrap(self.replans[i].slot(positions), below)
            is_pad |= pad
        return (positions if self.order is None else self.order(positions)), is_pad

    def _window(self, w: int) -> tuple:
        for entry in self._recent:
            if entry[0] == w:
                return entry
        entry = (w, *self._bucketed(w))
        self._recent = (entry, *self._recent[:1])  # one assignment: safe for reader threads
        return entry

    def _bucketed(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        """Window ``w`` sorted by aspect ratio, cut into batches, full batches shuffled."""
        step = self.bucket_window * self.batch_size
        indices, is_pad = self._slots(w * step, min((w + 1) * step, self.per_rank))
        ratios = self.aspect(indices) if callable(self.aspect) else np.asarray(self.aspect)[indices]
        order = np.argsort(np.asarray(ratios, dtype=np.float64), kind="stable")
        full = len(order) // self.batch_size
        if self.shuffle:
            batches = _rng(self.seed, self.epoch, self.rank, 1, w).permutation(full)
            head = order[: full * self.batch_size].reshape(full, self.batch_size)[batches].ravel()
            order = np.concatenate([head, order[full * self.batch_size :]])
        return indices[order], is_pad[order]


def _wrap(positions: np.ndarray, domain: int) -> tuple[np.ndarray, np.ndarray]:
    """Slots past the domain wrap around to its start and are flagged as pads."""
    is_pad = positions >= domain
    return np.where(is_pad, positions - domain, positions), is_pad


def epoch_plan(num_samples: int, **kwargs) -> EpochPlan:
    """This rank's batches for ``epoch`` (see the module docstring for the rules; the
    keywords are ``EpochPlan``'s). ``aspect``: width/height per sample index, or a
    function of an index array (what ``ShardIndex.aspect_of`` is), for bucketing.
    ``shard_counts`` (samples per shard; training with shuffle only): the shard-window
    order, each rank reading a block of it; ``replans``: the world sizes that already
    read part of this epoch (``Replan``)."""
    return EpochPlan(num_samples, **kwargs)
