"""A streamed position re-planned for another shape (``readers/stream_replan.py``), checked
against real streams over real shards: the old streams take samples through their shuffle
buffers, the re-plan splits the shards left over the new streams, and what the new streams
read again (repeated) or never get (skipped) is exactly what the log line says, within the
shards in flight (repeated) and one buffer (skipped) per old stream. Every shard left goes to exactly
one new stream, and a second re-plan (2 ranks -> 1 -> 2) keeps the same account."""

from __future__ import annotations

import collections
import itertools
import re

import pytest

from pixelbert_dist.data.readers.stream import StreamPlan
from pixelbert_dist.data.readers.stream_read import read_shard
from pixelbert_dist.data.readers.stream_replan import (
    StreamPosition,
    base_order,
    replan_stream_state,
    stream_shards,
)
from pixelbert_dist.data.readers.stream_urls import expand
from tests.data_helpers import write_tiny_shards

SHARDS, PER_SHARD, BUFFER, SEED, EPOCH, IN_FLIGHT = 12, 5, 4, 3, 1, 2


@pytest.fixture(scope="module")
def urls(tmp_path_factory):
    folder = tmp_path_factory.mktemp("replan") / "train"
    write_tiny_shards(folder, SHARDS, PER_SHARD)
    return expand(f"{folder}/train-{{000000..{SHARDS - 1:06d}}}.tar")


def plan(urls, rank, world, state=None, resampled=False, in_flight=IN_FLIGHT) -> StreamPlan:
    replans = (state or {}).get("stream_replans", [])
    order = None if not replans else base_order(len(urls), SEED, EPOCH, True, replans)
    return StreamPlan(
        urls, SEED, EPOCH, rank, world, 2, 100, resampled, True, BUFFER, 0, in_flight, order, len(replans)
    )


def take(stream_plan, worker, workers, count, skip=0) -> tuple[list, list]:
    """The keys of ``count`` samples of one stream (after ``skip``), and its position then."""
    position = StreamPosition()
    samples = stream_plan.samples(worker, workers, [], skip, position)
    return [raw.key for raw in itertools.islice(samples, count)], position.snapshot()


def saved_state(world, workers, positions, state=None) -> dict:
    """Rank 0's streamed loader state with every rank's positions (as a save gathers them)."""
    base = {"version": 1, "epoch": EPOCH, "seed": SEED, "shuffle": True, "resampled": False, "stream_urls": SHARDS}
    ranks = [positions[r * workers : (r + 1) * workers] for r in range(world)]
    shape = {"world_size": world, "num_workers": workers, "batch_size": 2, "batches_done": 3}
    return {**base, **(state or {}), **shape, "stream_ranks": ranks, "stream_cursors": [0] * workers}


def counts(line: str) -> tuple[int, int]:
    found = re.search(r"(\d+) samples repeated .*?, (\d+) skipped", line)
    assert found, line
    return int(found[1]), int(found[2])


def keys_of(urls, shards) -> list:
    return [raw.key for shard in shards for raw in read_shard(urls[shard], 0, [])]


def test_the_position_after_a_resume_replay_is_the_uninterrupted_streams(urls):
    """The replay (index sidecars) and the plain read leave the same position behind."""
    whole = plan(urls, 1, 2)
    for count in (1, 4, 9, 13):
        keys, position = take(whole, 1, 2, count)
        first, _ = take(whole, 1, 2, 3)
        rest, resumed = take(whole, 1, 2, count - 3, skip=3) if count > 3 else (keys[3:], position)
        assert (first + rest)[:count] == keys
        assert resumed == position, count


@pytest.mark.parametrize("in_flight", [1, 2])
@pytest.mark.parametrize("new_world, new_workers", [(1, 2), (1, 3), (3, 1)])
def test_a_replan_accounts_for_every_sample(urls, new_world, new_workers, in_flight):
    takes = [0, 3, 8, 11]  # per old stream (2 ranks x 2 workers of 3 shards each): none cycles yet
    taken, positions = [], []
    for stream, count in enumerate(takes):
        keys, position = take(plan(urls, stream // 2, 2, in_flight=in_flight), stream % 2, 2, count)
        taken += keys
        positions.append(position)
    state, line = replan_stream_state(
        saved_state(2, 2, positions), {"world_size": new_world, "num_workers": new_workers, "batch_size": 2}
    )
    assert state["batches_done"] == 3 * 2 * 2 // (2 * new_world)
    assert state["stream_cursors"] == [0] * new_workers and "stream_ranks" not in state
    left = base_order(SHARDS, SEED, EPOCH, True, state["stream_replans"])
    lists = [stream_shards(left, new_world, new_workers, s) for s in range(new_world * new_workers)]
    assert sorted(sum(lists, [])) == sorted(left) and len(set(left)) == len(left)  # each shard left once
    again = collections.Counter(taken) & collections.Counter(keys_of(urls, left))
    never = set(keys_of(urls, range(SHARDS))) - set(taken) - set(keys_of(urls, left))
    repeated, skipped = counts(line)
    assert (repeated, skipped) == (sum(again.values()), len(never)), line
    assert repeated <= len(takes) * in_flight * PER_SHARD and skipped <= len(takes) * (BUFFER - 1)
    assert repeated > 0 and (skipped > 0 or in_flight > 1)  # both, one shard at a time
    assert f"{len(left)} of {SHARDS} shards left" in line


def test_two_ranks_to_one_and_back_keep_the_account(urls):
    """2 ranks -> 1 (two workers) -> 2: what the three runs took, plus the shards left at
    the end, is every sample, less the skipped, with the repeated counted twice."""
    taken, positions = [], []
    for stream, count in enumerate([2, 6, 4, 7]):
        keys, position = take(plan(urls, stream // 2, 2), stream % 2, 2, count)
        taken, positions = taken + keys, positions + [position]
    one, first = replan_stream_state(saved_state(2, 2, positions), {"world_size": 1, "num_workers": 2, "batch_size": 2})
    positions = []
    for worker, count in enumerate([9, 5]):
        keys, position = take(plan(urls, 0, 1, one), worker, 2, count)
        taken, positions = taken + keys, positions + [position]
    two, second = replan_stream_state(
        saved_state(1, 2, positions, one), {"world_size": 2, "num_workers": 2, "batch_size": 2}
    )
    assert [e["world_size"] for e in two["stream_replans"]] == [2, 1]
    left = keys_of(urls, base_order(SHARDS, SEED, EPOCH, True, two["stream_replans"]))
    (rep1, skip1), (rep2, skip2) = counts(first), counts(second)
    seen = collections.Counter(taken) + collections.Counter(left)
    assert sum(seen.values()) - len(seen) == rep1 + rep2  # each repeat read once more
    assert SHARDS * PER_SHARD - len(seen) == skip1 + skip2
    assert max(seen.values()) <= 3  # a sample is read again at most once per re-plan


def test_streams_that_ran_out_leave_nothing_and_say_so(urls):
    """A stream that read all its shards (and cycles) has none left; with fewer shards left
    than new streams, the epoch's whole order follows, so every new stream has one."""
    positions = [take(plan(urls, s // 2, 2, in_flight=1), s % 2, 2, 14)[1] for s in range(4)]  # 15 each: all read
    now = {"world_size": 2, "num_workers": 2, "batch_size": 2}
    state, line = replan_stream_state(saved_state(2, 2, positions), now)
    assert "4 old stream(s) had read all their shards" in line
    assert "fewer shards left than new streams" in line
    assert counts(line)[0] == 0  # no shard is read again by the re-plan: they all came round already
    left = base_order(SHARDS, SEED, EPOCH, True, state["stream_replans"])
    assert sorted(left) == list(range(SHARDS))


def test_a_resampled_replan_draws_afresh(urls):
    positions = [take(plan(urls, s // 2, 2, resampled=True), s % 2, 2, 6)[1] for s in range(4)]
    saved = {**saved_state(2, 2, positions), "resampled": True}
    state, line = replan_stream_state(saved, {"world_size": 1, "num_workers": 2, "batch_size": 2})
    assert "the new streams draw afresh, 0 samples repeated" in line
    fresh = plan(urls, 0, 1, state, resampled=True)
    old = plan(urls, 0, 1, resampled=True)
    assert take(fresh, 0, 2, 10)[0] != take(old, 0, 2, 10)[0]  # seeded apart from the old streams
