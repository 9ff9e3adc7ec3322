"""A streamed resume steps over the shards it has no use for: the skip is replayed over
(shard, row) positions with shard lengths from the index sidecars, so only the shards that
still hold buffered or later samples are read, and the samples after the skip are the ones
an uninterrupted stream gives (shuffle buffer, shards in flight, cycling and resampled shard
orders alike).
Without sidecars the skip reads and drops, as before."""

from __future__ import annotations

import itertools
import shutil

import pytest

from pixelbert_dist.data.readers import stream_mix
from pixelbert_dist.data.readers import stream_read
from pixelbert_dist.data.readers.stream_urls import expand
from pixelbert_dist.data.format.shards import ShardWriter
from pixelbert_dist.data.readers.stream import StreamPlan
from tests.data_helpers import make_jpeg, write_tiny_shards

SHARDS, PER_SHARD, TAKE = 10, 4, 70  # 40 samples: a worker's 5 shards cycle within TAKE


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The same shards with their index sidecars and without."""
    indexed = tmp_path_factory.mktemp("indexed") / "train"
    write_tiny_shards(indexed, SHARDS, PER_SHARD)
    bare = tmp_path_factory.mktemp("bare") / "train"
    shutil.copytree(indexed, bare, ignore=shutil.ignore_patterns("*.idx.npy"))
    assert len(list(indexed.glob("*.idx.npy"))) == SHARDS and not list(bare.glob("*.idx.npy"))
    return indexed, bare


def plan(folder, resampled: bool, shuffle: bool, in_flight: int = 1) -> StreamPlan:
    urls = expand(f"{folder}/train-{{000000..{SHARDS - 1:06d}}}.tar")
    return StreamPlan(urls, 3, 1, 0, 1, 2, 100, resampled, shuffle, buffer=7, retries=0, in_flight=in_flight)


@pytest.mark.parametrize(
    ("resampled", "shuffle", "in_flight"),
    [(False, True, 1), (True, True, 1), (False, False, 1), (False, True, 3), (True, True, 3)],
)
def test_a_resume_reads_only_the_shards_it_needs(folders, monkeypatch, resampled, shuffle, in_flight):
    opened = []
    read_shard = stream_mix.read_shard
    monkeypatch.setattr(stream_mix, "read_shard", lambda url, *args: opened.append(url) or read_shard(url, *args))

    def keys(folder, skip):
        opened.clear()
        samples = plan(folder, resampled, shuffle, in_flight).samples(1, 2, [], skip=skip)  # worker 1 of 2
        return [raw.key for raw in itertools.islice(samples, TAKE - skip)], len(opened)

    indexed, bare = folders
    whole, _ = keys(indexed, 0)
    assert len(set(whole)) < len(whole)  # the worker's shards came round again
    for skip in (1, 6, 23, 45, 69):
        fast, fast_reads = keys(indexed, skip)
        slow, slow_reads = keys(bare, skip)
        assert fast == slow == whole[skip:], skip
        # a buffer of 7 spans at most 3 shards of 4, plus the others in flight and those read after the skip
        assert fast_reads <= slow_reads - skip // PER_SHARD + 2 + in_flight, (skip, fast_reads, slow_reads)


@pytest.mark.parametrize("in_flight", [1, 3])
@pytest.mark.parametrize("skip", [6, 23, 45, 69])
def test_a_resume_fetches_no_sidecar_twice(folders, monkeypatch, skip, in_flight):
    """The sidecars the replay fetched for shard lengths serve the reads of the shards
    still in the buffer: a resume fetches no more sidecars than the uninterrupted stream
    did to reach the same place (one per shard read; fewer where a shard came round again
    within the skip)."""
    fetched, fetch = [], stream_read.fetch
    monkeypatch.setattr(stream_read, "fetch", lambda url: fetched.append(url) or fetch(url))

    def fetches(skip):
        fetched.clear()
        samples = plan(folders[0], False, True, in_flight).samples(1, 2, [], skip=skip)
        assert len(list(itertools.islice(samples, TAKE - skip))) == TAKE - skip
        return len(fetched)

    assert fetches(skip) <= fetches(0)


class CountingStream:
    """A shard stream that counts the bytes read from it (into ``total``)."""

    def __init__(self, stream, total: list):
        self.stream, self.total = stream, total

    def read(self, size=-1):
        data = self.stream.read(size)
        self.total[0] += len(data)
        return data

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stream.close()


@pytest.mark.parametrize("in_flight", [1, 3])
def test_a_resume_reads_a_shard_from_its_oldest_row_still_needed(tmp_path, monkeypatch, in_flight):
    """Where the store can seek (local files, fsspec stores), the shards a resume reads
    again start at the byte their sidecar gives for the oldest row still needed: fewer
    bytes than reading each from its start, the same samples."""
    with ShardWriter(tmp_path, "big", samples_per_shard=8) as writer:  # ~10 KB a sample
        for i in range(48):
            writer.write(f"img{i:04d}", make_jpeg(200, 200, i), {"key": f"img{i:04d}", "captions": [f"caption {i}"]})
    urls = expand(f"{tmp_path}/big-{{000000..000005}}.tar")
    total, starts, open_shard = [0], [], stream_read.open_shard

    def counting(url, start=0):
        starts.append(start)
        return CountingStream(open_shard(url, start), total)

    monkeypatch.setattr(stream_read, "open_shard", counting)

    def resume(can_seek: bool) -> tuple[list, int]:
        monkeypatch.setattr(stream_read, "seekable", lambda url: can_seek)
        total[0] = 0
        stream_plan = StreamPlan(urls, 3, 1, 0, 1, 2, 100, False, True, buffer=7, retries=0, in_flight=in_flight)
        samples = stream_plan.samples(0, 1, [], skip=21)
        first = next(samples).key  # by then the resume has read what it adds
        added = total[0]
        return [first] + [raw.key for raw in itertools.islice(samples, 20)], added

    ranged, ranged_bytes = resume(True)
    assert any(starts)
    starts.clear()
    whole, whole_bytes = resume(False)
    assert not any(starts)
    assert ranged == whole
    assert ranged_bytes < 0.8 * whole_bytes, (ranged_bytes, whole_bytes)  # 0.75 at 1 in flight, 0.40 at 3
