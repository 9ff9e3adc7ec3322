"""Recall@K from score rows split over ranks equals recall@K of the whole matrix (ties
included), and the store keeps finished batches across a restart."""

from __future__ import annotations

import threading

import pytest
import torch

from pixelbert_dist.finetune.score_store import ScoreStore, load_score_matrix, sharded_recall
from pixelbert_dist.train.recall import recall_at_k


class ThreadSum:
    """An all-reduce (sum) between ``n`` threads standing in for ranks."""

    def __init__(self, n: int):
        self.barrier, self.parts, self.lock = threading.Barrier(n), [], threading.Lock()

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.parts.append(tensor.clone())
        self.barrier.wait()
        total = torch.stack(self.parts).sum(0).to(tensor.dtype)
        self.barrier.wait()
        with self.lock:
            self.parts.clear()
        self.barrier.wait()
        return total


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_sharded_recall_equals_recall_of_the_whole_matrix(ranks):
    gen = torch.Generator().manual_seed(ranks)
    owner = torch.tensor([i // 5 for i in range(40)] + [2, 5])  # 8 images, two with 6 captions
    scores = torch.randint(0, 4, (8, 42), generator=gen).float()  # many ties
    order = torch.randperm(8, generator=gen)  # rows in any order, any split
    shards = [order[r::ranks] for r in range(ranks)]
    reduce, results = ThreadSum(ranks), [None] * ranks

    def rank(r):
        results[r] = sharded_recall(shards[r], scores[shards[r]], owner, 8, all_reduce=reduce)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [recall_at_k(scores, owner)] * ranks


def test_rows_missing_or_twice_are_refused():
    scores, owner = torch.zeros(3, 3), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="cover 2 of 3 images"):
        sharded_recall(torch.tensor([0, 1]), scores[:2], owner, 3)


def test_store_keeps_finished_batches_and_restarts_for_another_model(tmp_path):
    store = ScoreStore(tmp_path, 0, {"model": "a"})
    store.write(0, torch.tensor([2, 0]), torch.ones(2, 4))
    store.write(1, torch.tensor([1]), torch.zeros(1, 4))
    again = ScoreStore(tmp_path, 0, {"model": "a"})
    assert again.batches_done() == 2
    images, rows = again.rows(4)
    assert images.tolist() == [2, 0, 1]
    assert load_score_matrix(tmp_path, 3, 4)[1].tolist() == [0, 0, 0, 0]
    assert ScoreStore(tmp_path, 0, {"model": "b"}).batches_done() == 0  # other weights: afresh
