"""Streamed workers read several shards at once (``readers/stream_mix.py``): a batch then
mixes shards (the same-shard fraction of its pairs falls from most of them to about
1 / shards in flight), the order stays a pure function of the seed, the replay over
(shard, row) positions is the real read order, and a loader resumed mid-mix continues
exactly; a state saved before the mixing resumes only as it was read, one shard at a time."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from pixelbert_dist.data.readers.stream import StreamPlan
from pixelbert_dist.data.readers.stream_mix import position_stream
from pixelbert_dist.data.readers.stream_read import shard_check
from pixelbert_dist.data.readers.stream_urls import expand
from tests.data_helpers import write_tiny_shards
from tests.stream_helpers import pil_stream, same_batches

SHARDS, PER_SHARD, BATCH, BUFFER = 16, 24, 8, 12  # shards twice the buffer, as 2000 vs 1000
PATTERN = f"train-{{000000..{SHARDS - 1:06d}}}.tar"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mix") / "train"
    write_tiny_shards(folder, SHARDS, PER_SHARD)
    return folder


def plan(folder, in_flight: int, seed: int = 3, resampled: bool = False, epoch: int = 1) -> StreamPlan:
    urls = expand(str(folder / PATTERN))
    return StreamPlan(urls, seed, epoch, 0, 1, BATCH, 100, resampled, True, BUFFER, 0, in_flight)


def read(stream_plan: StreamPlan, samples: int) -> list:
    return list(itertools.islice(stream_plan.samples(0, 1, []), samples))


def same_shard_pairs(shards: list) -> float:
    """The fraction of in-batch pairs whose two samples share a shard (consecutive batches
    of BATCH: a worker makes whole batches)."""
    same = pairs = 0
    for k in range(0, len(shards) - BATCH + 1, BATCH):
        _, per = np.unique(shards[k : k + BATCH], return_counts=True)
        same, pairs = same + int((per * (per - 1)).sum()), pairs + BATCH * (BATCH - 1)
    return same / pairs


def test_shards_in_flight_mix_a_batch(folder):
    one, eight = (same_shard_pairs([raw.url for raw in read(plan(folder, k), 240)]) for k in (1, 8))
    assert one > 0.5, one  # one shard at a time: the buffer holds one or two shards (0.565)
    assert eight < 0.15 and eight < one / 4, (eight, one)  # ~1/8 with 8 in flight (0.083)


def test_the_mixed_order_is_seeded(folder):
    keys = [raw.key for raw in read(plan(folder, 8), SHARDS * PER_SHARD - BUFFER)]
    assert keys == [raw.key for raw in read(plan(folder, 8), len(keys))]
    assert keys[:200] != [raw.key for raw in read(plan(folder, 8, seed=4), 200)]
    assert keys[:200] != [raw.key for raw in read(plan(folder, 8, epoch=2), 200)]
    # what left the buffer before any shard came round again: each sample once
    assert len(set(keys)) == len(keys)


@pytest.mark.parametrize("resampled", [False, True])
def test_the_position_replay_is_the_real_read_order(folder, resampled):
    """What the resume's replay and the benchmark compute over shard lengths is the order
    the shards are really read in."""
    stream_plan = plan(folder, 5, resampled=resampled)
    where = position_stream(stream_plan, 0, 1, lambda url: len(shard_check(url, 0, [])))
    replayed = [(where.seen[shard], row) for shard, row in itertools.islice(where.samples, 300)]
    real = read(stream_plan, 300)
    shard_of = {url: s for s, url in enumerate(stream_plan.urls)}
    assert [f"img{shard_of[url] * PER_SHARD + row:04d}" for url, row in replayed] == [raw.key for raw in real]
    assert [url for url, _ in replayed] == [raw.url for raw in real]


def test_a_loader_resumes_mid_mix_exactly(folder):
    spec = str(folder / PATTERN)
    kw = dict(world_size=1, num_workers=2, epoch_samples=60, shuffle_buffer=BUFFER)  # 8 shards a worker
    full = list(pil_stream(spec, **kw))
    first = pil_stream(spec, **kw)
    taken = list(itertools.islice(first, 7))
    state = json.loads(json.dumps(first.state_dict()))
    assert state["shards_in_flight"] == 16
    again = pil_stream(spec, **kw)
    again.load_state_dict(state)
    same_batches(taken + list(again), full)
    old = {k: v for k, v in state.items() if k != "shards_in_flight"}  # saved before shards were mixed
    with pytest.raises(ValueError, match=r"'shards_in_flight': \(1, 16\)"):
        pil_stream(spec, **kw).load_state_dict(old)
    pil_stream(spec, shards_in_flight=1, **kw).load_state_dict(old)
