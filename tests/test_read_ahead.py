"""Read-ahead off the calling thread (data/decode/read_ahead.py) and the DALI feeds that
use it: the shard reads run on the reader thread, the batches are those of the same
feed read on the calling thread, and no reader outlives its pass (also after a batch
DALI cannot decode, which restarts the pipeline with a new feed)."""

from __future__ import annotations

import gc
import threading
from collections import deque

import pytest
import torch

from pixelbert_dist.data.decode.dali import DaliImages, dali_available
from pixelbert_dist.data.decode.read_ahead import prefetched
from pixelbert_dist.data.format.shards import ShardWriter
from pixelbert_dist.data.readers import indexed
from pixelbert_dist.data.readers.indexed import ShardIndex
from tests.data_helpers import MAX, SHORTER, make_jpeg, mixed_sizes

N, BATCH = 14, 4
UNDECODABLE = b"\xff\xd8" + b"this is not a JPEG stream " * 8 + b"\xff\xd9"  # passes the byte checks


def _readers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "pixelbert-read-ahead" and t.is_alive()]


def test_items_in_order_read_off_the_caller_and_at_most_depth_ahead():
    threads, read = [], [0]

    def feed():
        for i in range(50):
            threads.append(threading.get_ident())
            read[0] += 1
            yield i

    ahead, depth, got, most_ahead = prefetched(feed(), 3), 3, [], 0
    for item in ahead:
        got.append(item)
        most_ahead = max(most_ahead, read[0] - len(got))
    assert got == list(range(50))
    assert threading.get_ident() not in threads and len(set(threads)) == 1
    assert most_ahead <= depth + 1  # the ready ones and the one in the reader's hand
    assert not _readers()


def test_the_feeds_error_comes_after_its_items_then_the_end():
    def feed():
        yield 1
        yield 2
        raise ValueError("shard gone")

    ahead = prefetched(feed(), 1)
    assert [next(ahead), next(ahead)] == [1, 2]
    with pytest.raises(ValueError, match="shard gone"):
        next(ahead)
    with pytest.raises(StopIteration):
        next(ahead)
    assert not _readers()


def test_close_and_garbage_stop_a_reader_that_waits_on_a_full_queue():
    ahead = prefetched(iter(range(1000)), 2)
    assert next(ahead) == 0
    ahead.close()
    assert not _readers()
    with pytest.raises(StopIteration):
        next(ahead)
    dropped = prefetched(iter(range(1000)), 2)
    next(dropped)
    del dropped
    gc.collect()
    assert not _readers()


class RecordingIndex(ShardIndex):
    """A real ShardIndex that notes the thread of every sample read."""

    def read(self, i: int):
        self.threads.add(threading.get_ident())
        return super().read(i)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    directory = tmp_path_factory.mktemp("read-ahead") / "train"
    with ShardWriter(directory, "train", samples_per_shard=5) as writer:
        for i, (height, width) in enumerate(mixed_sizes(N, seed=2)):
            key = f"img{i:04d}"
            jpeg = UNDECODABLE if i == 9 else make_jpeg(height, width, i)
            writer.write(key, jpeg, {"key": key, "captions": [f"caption {i}"], "width": width, "height": height})
    return directory


def _dali(directory) -> tuple[DaliImages, RecordingIndex]:
    if not dali_available():
        pytest.skip("NVIDIA DALI is not installed")
    index = RecordingIndex(directory)
    index.threads = set()
    return DaliImages(index, BATCH, SHORTER, MAX, num_threads=1, prefetch=2), index


def _on_this_thread(dali: DaliImages, work) -> list:
    """The batches of ``work`` decoded from a feed read here, as before the read-ahead."""
    feed = iter([(None, [dali.index.jpeg(i) for i, _ in b], [f for _, f in b]) for b in work])
    failures: list[str] = []
    out = [(images, hw) for _, images, hw in dali.decode(feed, deque(), failures)]
    assert not failures
    return out


def test_dali_batches_read_off_the_main_thread_and_equal_reading_on_it(split):
    dali, index = _dali(split)
    work = [[(i, i % 3 == 0) for i in range(k, k + BATCH)] for k in (0, 4, 10)]  # no sample 9
    got = list(dali.batches(work))
    assert index.threads and threading.get_ident() not in index.threads
    reference = _on_this_thread(dali, work)
    assert len(got) == len(reference) == 3
    for (images, hw), (ref_images, ref_hw) in zip(got, reference):
        assert torch.equal(hw, ref_hw) and torch.equal(images, ref_images)
    assert not _readers()


def test_dali_samples_after_an_undecodable_batch_stop_the_old_reader(split):
    dali, index = _dali(split)
    batches = [list(range(k, min(k + BATCH, N))) for k in range(0, N, BATCH)]
    got = list(dali.samples(batches, lambda key: key.endswith("3")))
    assert threading.get_ident() not in index.threads
    assert not _readers()  # the reader of the failed pass as well
    used = [[s.index for s in b.samples] for b in got]
    assert 9 not in sum(used, []) and [len(u) for u in used] == [len(b) for b in batches]
    assert [d.index for b in got for d in b.damaged] == [9]
    work = [[(s.index, flip) for s, flip in zip(b.samples, b.flips)] for b in got]
    for batch, (ref_images, ref_hw) in zip(got, _on_this_thread(dali, work)):
        assert torch.equal(batch.sizes, ref_hw) and torch.equal(batch.images, ref_images)


def test_two_threads_share_a_shard_index_that_keeps_one_shard_open(split, monkeypatch):
    """The reader thread and the main thread both read through one index; with one open
    shard allowed, each read evicts (closes) the other thread's descriptor."""
    monkeypatch.setattr(indexed, "MAX_OPEN_SHARDS", 1)
    index, expected = ShardIndex(split), [ShardIndex(split).read(i).jpeg for i in range(N)]
    errors: list[BaseException] = []

    def read_all(order):
        try:
            for _ in range(150):
                for i in order:
                    assert index.read(i).jpeg == expected[i]
        except BaseException as err:  # noqa: BLE001 - checked below
            errors.append(err)

    other = threading.Thread(target=read_all, args=(list(range(N)),))
    other.start()
    read_all(list(reversed(range(N))))
    other.join()
    assert not errors, errors[0]
