"""A streamed worker's sample order (``readers/stream.py``): ``data.shards_in_flight``
shards read at once, one sample from each in turn (``ShardMix``), through a seeded shuffle
buffer of ``data.shuffle_buffer`` samples (``shuffled``); and the replay a resume uses to
rebuild both where the saved run left them without reading what it skipped.

Why several shards at once: a worker reading one shard at a time fills its buffer from one
or two shards, so a batch (made by one worker) holds pairs from the same shard: 91% of them
with shards of 2000 and a buffer of 1000 (``benchmarks/bench_metadata.py``), and ITM's
in-batch negatives become same-shard ones. With N shards in flight the buffer holds about
1/N of its samples from each: about 1/N of the pairs share a shard (6% at the default 16;
never below 1 / the worker's own shard count, whose shards it cycles). Webdataset/OpenCLIP
shuffle the shard list instead, which leaves a batch within one or two shards.

The order is a pure function of the seed, the position and the shards' lengths: an
exhausted shard's turn opens the next URL of the worker's shard stream, so the replay over
(shard number, row) positions (lengths from the index sidecars) lands where the real read
did. Only training mixes (``data.shuffle``); evaluation reads one shard at a time, in order.

Memory per worker, bounded: the buffer's encoded samples (``shuffle_buffer`` x the mean
sample size: ~150 MB at 1000 COCO-sized JPEGs) plus one open read per shard in flight
(a curl process and a pipe for http(s); fsspec's read-ahead block, ``stream_urls.READ_AHEAD``,
for object stores). Request rates do not change: each shard is still opened once per pass.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterator, NamedTuple

import numpy as np

from pixelbert_dist.data.readers.stream_read import UNREAD, Raw, read_shard, shard_check

KEPT_CHECKS = 8  # sidecars a resume's replay keeps beyond those of the shards in flight


class Unindexed(Exception):
    """A shard without an index sidecar: its length is unknown, so a resume reads and drops."""


class ShardMix:
    """Samples from ``width`` shards at once, one from each in turn. A slot whose shard is
    exhausted opens the next URL of ``urls`` (``open_shard(url)``: an iterator of its
    samples) on its turn, so the order depends only on the shards' lengths. ``slots`` (each
    None or ``[samples, last taken]``) and ``turn`` say where it stands: a resume rebuilds
    one mid-way."""

    def __init__(self, urls: Iterator[str], open_shard: Callable, width: int, slots=None, turn: int = 0):
        self.urls, self.open_shard, self.turn = urls, open_shard, turn
        self.slots: list = slots if slots is not None else [None] * width

    def __iter__(self) -> "ShardMix":
        return self

    def __next__(self):
        while True:
            slot = self.slots[self.turn]
            if slot is None:
                slot = self.slots[self.turn] = [self.open_shard(next(self.urls)), None]
            try:
                slot[1] = next(slot[0])
            except StopIteration:
                self.slots[self.turn] = None  # the next URL takes this turn
                continue
            self.turn = (self.turn + 1) % len(self.slots)
            return slot[1]


def mix_width(plan, worker: int, workers: int) -> int:
    """Shards the worker reads at once: 1 without shuffling; else ``plan.in_flight``, no
    more than the worker's own shards (without resampling it cycles through them)."""
    if not plan.shuffle:
        return 1
    if plan.resampled:
        return max(1, plan.in_flight)
    return max(1, min(plan.in_flight, len(plan.own_shards(worker, workers))))


def shuffled(plan, items: Iterator, rng: np.random.Generator, buffer: list, position=None) -> Iterator:
    """``items`` through the shuffle buffer (``buffer``: what it holds, kept in place).
    With a ``position`` (``stream_replan.StreamPosition``) each item is a pair whose first
    element is its shard's number in the stream, and ``position`` follows them."""
    for item in items:
        if position is not None:
            position.read(item[0])
        if not plan.shuffle or plan.buffer <= 1:
            if position is not None:
                position.took(item[0])
            yield item
            continue
        buffer.append(item)
        if len(buffer) >= plan.buffer:
            i = int(rng.integers(len(buffer)))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            item = buffer.pop()
            if position is not None:
                position.took(item[0])
            yield item


class Positions(NamedTuple):
    """A worker's order over (shard number, row) positions (``position_stream``)."""

    samples: Iterator[tuple[int, int]]  # shard number: an index into ``seen``
    rng: np.random.Generator
    urls: Iterator[str]
    seen: list  # the URL of each shard opened, in order
    mix: ShardMix
    buffer: list


def position_stream(
    plan, worker: int, workers: int, length_of: Callable[[str], int | None], position=None
) -> Positions:
    """The worker's sample order over positions, each shard's length ``length_of(url)``
    (None: unknown, raises ``Unindexed``); the benchmark's and the resume's replay
    (``position``: followed through it, as ``shuffled`` does)."""
    rng, urls = plan.start(worker, workers)
    seen: list[str] = []

    def open_positions(url: str) -> Iterator[tuple[int, int]]:
        length = length_of(url)
        if length is None:
            raise Unindexed(url)
        seen.append(url)
        return zip(itertools.repeat(len(seen) - 1), range(length))

    mix = ShardMix(urls, open_positions, mix_width(plan, worker, workers))
    buffer: list = []
    return Positions(shuffled(plan, mix, rng, buffer, position), rng, urls, seen, mix, buffer)


def _numbered(read: Callable[[str], Iterator[Raw]], first: int) -> Callable:
    """``read`` (url -> samples) whose samples come as (shard number, sample) pairs, the
    shards numbered from ``first`` in the order they are opened."""
    numbers = itertools.count(first)

    def open_shard(url: str) -> Iterator[tuple[int, Raw]]:
        return zip(itertools.repeat(next(numbers)), read(url))

    return open_shard


def _in_flight(mix: ShardMix) -> Callable[[], set]:
    """The numbers of the shards ``mix`` is reading (each slot's last pair names its shard)."""
    return lambda: {slot[1][0] for slot in mix.slots if slot is not None and slot[1] is not None}


def _opener(plan, errors: list) -> Callable[[str], Iterator[Raw]]:
    return lambda url: read_shard(url, plan.retries, errors, UNREAD, 0, plan.caption_key)


def worker_samples(plan, worker: int, workers: int, errors: list, skip: int = 0, position=None) -> Iterator[Raw]:
    """This worker's samples (``Raw``), from its ``skip``-th on (a resume). Which samples
    the first ``skip`` are, what the buffer then holds and how far each shard in flight
    was read depend only on the shards' lengths: where the index sidecars say so, the skip
    is replayed over positions and only the shards still holding buffered or later samples
    are read, each from its oldest row still needed (a ranged read where the store can
    seek); else the first ``skip`` are read and dropped. ``position``
    (``stream_replan.StreamPosition``) follows where the stream stands."""
    width = mix_width(plan, worker, workers)
    replay = _replay(plan, worker, workers, errors, skip, position) if skip else None
    if replay is None:
        rng, urls = plan.start(worker, workers)
        mix = ShardMix(urls, _numbered(_opener(plan, errors), 0), width)
        if position is not None:
            position.restart(_in_flight(mix))  # a replay without sidecars may have begun it
        yield from (raw for _, raw in itertools.islice(shuffled(plan, mix, rng, [], position), skip, None))
        return
    where, checks = replay
    buffer = where.buffer
    slots: dict[int, dict[int, int]] = {}  # shard number -> {row: buffer slot}
    for slot, (shard, row) in enumerate(buffer):
        slots.setdefault(shard, {})[row] = slot
    in_flight = {slot[1][0]: slot[1][1] for slot in where.mix.slots if slot is not None}  # shard -> last row

    def reread(shard: int, first_row: int) -> Iterator[tuple[int, Raw]]:  # with the sidecar the replay fetched
        url = where.seen[shard]
        return zip(
            itertools.repeat(shard),
            read_shard(url, plan.retries, errors, checks.get(url, UNREAD), first_row, plan.caption_key),
        )

    for shard in sorted(set(slots) - set(in_flight)):
        first = min(slots[shard])
        _fill(buffer, slots[shard], reread(shard, first), first, max(slots[shard]))
    readers: list = []
    for slot in where.mix.slots:
        if slot is None:
            readers.append(None)
            continue
        shard, last_row = slot[1]
        first = min([*slots.get(shard, {}), last_row + 1])  # the oldest row still buffered, else the next
        readers.append([reread(shard, first), (shard, None)])
        _fill(buffer, slots.get(shard, {}), readers[-1][0], first, last_row)  # up to the last row taken
    opener = _numbered(_opener(plan, errors), len(where.seen))
    mix = ShardMix(where.urls, opener, width, readers, where.mix.turn)
    if position is not None:
        position.in_flight = _in_flight(mix)
    yield from (raw for _, raw in shuffled(plan, mix, where.rng, buffer, position))


def _replay(plan, worker: int, workers: int, errors: list, skip: int, position) -> tuple[Positions, dict] | None:
    """The first ``skip`` samples taken over positions, shard lengths from the sidecars:
    the position stream just after them (its URL stream where the real one would be) and
    the last sidecars fetched (those of the shards in flight among them); None if a shard
    has no sidecar."""
    lengths: dict[str, int | None] = {}
    checks: dict = {}
    kept = mix_width(plan, worker, workers) + KEPT_CHECKS

    def length_of(url: str) -> int | None:
        if url not in lengths:
            checks[url] = shard_check(url, plan.retries, errors)
            lengths[url] = None if checks[url] is None else len(checks[url])
            if len(checks) > kept:  # the shards in flight and in the buffer are among the last ones
                del checks[next(iter(checks))]
        return lengths[url]

    where = position_stream(plan, worker, workers, length_of, position)
    try:
        taken = sum(1 for _ in itertools.islice(where.samples, skip))
    except Unindexed:
        return None
    return (where, checks) if taken == skip else None


def _fill(buffer: list, slots: dict, raws: Iterator[Raw], first_row: int, last_row: int) -> None:
    """Put the rows ``slots`` names (row -> buffer slot) into ``buffer``, reading ``raws``
    (rows ``first_row``, ...) up to ``last_row``."""
    if first_row > last_row:
        return
    for row, raw in enumerate(raws, first_row):
        if row in slots:
            buffer[slots[row]] = raw  # a (shard number, sample) pair, as the buffer's other items
        if row == last_row:
            return
