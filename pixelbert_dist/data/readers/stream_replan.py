"""A streamed position moved to another world size, worker count or batch size.

A streamed position is per worker stream (``stream.py``): stream ``s = rank * n + worker``
reads the shards ``base[rank::W][worker::n]`` of the epoch's shard order,
``data.shards_in_flight`` at once, through its shuffle buffer (``stream_mix.py``). Each
worker also tracks where its stream stands (``StreamPosition``): how many of its shards it
opened, the samples taken from each shard it is still reading, and the samples its buffer
holds from shards it has read to the end. Rank 0 keeps every rank's positions in the
checkpoint (``stream_ranks``), so a resume on another shape re-plans the rest of the epoch
from them alone, with no read of any shard or sidecar:

* the shards a stream read to the end are done; those it was reading and those it had not
  opened are left; every new stream restarts at a shard boundary, the new ranks and
  workers splitting what is left (in the epoch's order, as a fresh epoch splits all of it);
* the shards being read are read again from their start: the samples already taken from
  them are **repeated** (at most ``data.shards_in_flight`` shards per old stream, one
  without mixing); what the old buffers held from shards read to the end is **skipped**
  (at most ``data.shuffle_buffer - 1`` per old stream);
* fewer shards left than new streams: the epoch's other shards follow them, read again
  (the old streams would have cycled through theirs too);
* the epoch goes on by samples seen, as in the indexed mode: ``batches x batch x ranks``
  over the new ``batch x ranks``.

The re-plans of an epoch are kept in the loader state (``stream_replans``): each is
O(old streams) integers, and the epoch's remaining shard order is rebuilt from them in
O(shards) per re-plan on each rank. A resampled stream has no order to continue: the new
streams draw afresh (their seeds take the number of re-plans), the buffers' samples are
dropped. A stream that already cycles (its list ran out) has no shard left.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


def seeded_rng(*words) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(w) for w in words]))


def epoch_order(shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The epoch's shard order before any re-plan (indices into the URL list)."""
    return (seeded_rng(seed, epoch).permutation(shards) if shuffle else np.arange(shards)).tolist()


def start_position() -> list:
    """A ``StreamPosition`` snapshot of a stream that has read nothing yet."""
    return [0, [], 0]


class StreamPosition:
    """Where one worker's stream stands in its (cycling) shard list, shards numbered in
    the order the stream opens them: how many it opened, the samples taken from each
    shard it is reading (``data.shards_in_flight`` at once), and what its buffer holds per
    shard. ``in_flight`` (set by the reader) names the shards being read."""

    def __init__(self):
        self.restart(lambda: set())

    def restart(self, in_flight) -> None:
        self.opened, self.in_flight = 0, in_flight
        self.held: dict[int, int] = {}  # shard -> samples in the buffer
        self.taken: dict[int, int] = {}  # shard -> samples taken (pruned at each snapshot)

    def read(self, shard: int) -> None:
        """A sample of ``shard`` went into the buffer."""
        self.opened = max(self.opened, shard + 1)
        self.held[shard] = self.held.get(shard, 0) + 1

    def took(self, shard: int) -> None:
        """A sample of ``shard`` left the buffer (taken by a batch, or dropped as damaged)."""
        left = self.held[shard] - 1
        if left:
            self.held[shard] = left
        else:
            del self.held[shard]
        self.taken[shard] = self.taken.get(shard, 0) + 1

    def snapshot(self) -> list:
        """[shards opened, [[shard in flight, samples taken from it], ...], samples held
        from shards no longer in flight]: JSON-able, O(shards in flight)."""
        flying = self.in_flight()
        self.taken = {shard: n for shard, n in self.taken.items() if shard in flying}
        held = sum(n for shard, n in self.held.items() if shard not in flying)
        return [self.opened, [[shard, self.taken.get(shard, 0)] for shard in sorted(flying)], held]


class Replan(NamedTuple):
    remaining: list  # the shards left, in the epoch's order (indices into the URL list)
    repeated: int  # samples taken before that the new streams read again
    skipped: int  # samples the old buffers held, never taken
    cycled: int  # old streams whose list had run out (nothing of theirs is left)
    refilled: bool  # fewer shards were left than new streams: the epoch's others follow them
    reading: int  # shards the old streams were reading (read again from their start)


def stream_shards(base: list, world: int, workers: int, stream: int) -> list:
    """Stream ``stream``'s shard list (rank ``stream // workers``, worker ``stream % workers``)."""
    rank, worker = divmod(stream, workers)
    return base[rank::world][worker::workers]


def remaining_shards(base: list, world: int, workers: int, positions: list) -> list:
    """The shards of ``base`` no old stream has read to the end, in ``base``'s order:
    position ``p`` is shard ``j = p // (W n)`` of stream ``(p % W) * n + (p // W) % n``,
    left when that stream had not opened it yet or was still reading it."""
    reading = [{shard for shard, _ in flying} for _, flying, _ in positions]
    left = []
    for p, shard in enumerate(base):
        rank, q = p % world, p // world
        stream, j = rank * workers + q % workers, q // workers
        if j >= positions[stream][0] or j in reading[stream]:
            left.append(shard)
    return left


def replan(base: list, world: int, workers: int, positions: list, full: list, streams_after: int) -> Replan:
    """The rest of the epoch after old streams at ``positions`` (``StreamPosition``
    snapshots, stream order), for ``streams_after`` new streams. Fewer shards left than
    new streams: the epoch's other shards follow them (every stream needs a shard)."""
    left = remaining_shards(base, world, workers, positions)
    repeated = skipped = cycled = reading = 0
    for stream, (opened, flying, held) in enumerate(positions):
        rank, worker = divmod(stream, workers)
        mine = len(range(rank, len(base), world)[worker::workers])  # O(1): no list built
        first_pass = [taken for shard, taken in flying if shard < mine]  # later ones: the stream cycled
        repeated += sum(first_pass)  # each is read again from its start
        reading += len(first_pass)
        skipped += held
        cycled += opened >= mine and not first_pass
    refilled = len(left) < streams_after
    if refilled:  # the old plan would have cycled too: the epoch's other shards come round again
        kept = set(left)
        left = left + [shard for shard in full if shard not in kept]
    return Replan(left, repeated, skipped, cycled, refilled, reading)


def base_order(shards: int, seed: int, epoch: int, shuffle: bool, replans: list) -> list:
    """The epoch's shard order after its re-plans (``stream_replans`` entries)."""
    full = epoch_order(shards, seed, epoch, shuffle)
    base = full
    for entry in replans:
        base = replan(
            base, entry["world_size"], entry["workers"], entry["positions"], full, entry["streams_after"]
        ).remaining
    return base


def replan_stream_state(saved: dict, now: dict) -> tuple[dict, str]:
    """``saved`` (rank 0's streamed loader state, with every rank's positions) moved to the
    loader shape of ``now``; and the one log line that says what it cost."""
    ranks, world, workers = saved.get("stream_ranks"), saved["world_size"], saved["num_workers"] or 1
    if not isinstance(ranks, list) or len(ranks) != world or any(len(r) != workers for r in ranks):
        raise ValueError(
            f"data loader state has no stream positions of its {world} ranks ('stream_ranks'; saved by an "
            "earlier version): a streamed run resumes on another world size, worker count or batch size "
            f"only from a checkpoint that has them. Resume on {world} ranks with "
            f"data.num_workers={saved['num_workers']}"
        )
    positions = [p for rank in ranks for p in rank]
    new_workers = now["num_workers"] or 1
    streams_after = now["world_size"] * new_workers
    seen = saved["batches_done"] * saved["batch_size"] * world
    batches = seen // (now["batch_size"] * now["world_size"])
    replans = [
        *saved.get("stream_replans", []),
        {"world_size": world, "workers": workers, "positions": positions, "streams_after": streams_after},
    ]
    state = {key: value for key, value in saved.items() if key != "stream_ranks"}
    state.update(
        {key: now[key] for key in ("world_size", "batch_size", "num_workers")},
        batches_done=batches,
        stream_cursors=[0] * new_workers,
        stream_positions=[start_position() for _ in range(new_workers)],
        stream_replans=replans,
    )
    shape = f"{world} rank(s) x {workers} worker(s) x batch {saved['batch_size']}"
    new_shape = f"{now['world_size']} rank(s) x {new_workers} worker(s) x batch {now['batch_size']}"
    if saved["resampled"]:
        skipped = sum(p[-1] for p in positions)
        return state, (
            f"streamed position re-planned from {shape} to {new_shape}: {seen} samples into epoch "
            f"{saved['epoch']} -> batch {batches}; resampled: the new streams draw afresh, 0 samples repeated, "
            f"{skipped} skipped (held in the old shuffle buffers)"
        )
    base = base_order(saved["stream_urls"], saved["seed"], saved["epoch"], saved["shuffle"], replans[:-1])
    full = epoch_order(saved["stream_urls"], saved["seed"], saved["epoch"], saved["shuffle"])
    plan = replan(base, world, workers, positions, full, streams_after)
    return state, (
        f"streamed position re-planned from {shape} to {new_shape}: {seen} samples into epoch "
        f"{saved['epoch']} -> batch {batches}; {len(plan.remaining)} of {len(base)} shards left, each stream "
        f"restarts at a shard boundary: {plan.repeated} samples repeated (taken from the {plan.reading} "
        f"shards the {len(positions)} old streams were reading, read again), {plan.skipped} skipped (held in "
        "the old shuffle buffers, at most data.shuffle_buffer - 1 per old stream)"
        + (f"; {plan.cycled} old stream(s) had read all their shards" if plan.cycled else "")
        + ("; fewer shards left than new streams: the epoch's others follow them (read again)" if plan.refilled else "")
    )
