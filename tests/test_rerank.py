"""Two-stage retrieval's selection against a plain sort of the whole first-stage matrix
(ties by index, any split of the images over ranks), and its recalls against recall@K of
each direction's candidate matrix."""

from __future__ import annotations

import pytest
import torch

from pixelbert_dist.finetune.rerank import (
    candidates_only,
    i2t_candidates,
    local_t2i_best,
    merge_t2i_best,
    thinned_pixels,
)
from pixelbert_dist.finetune.score_store import sharded_recall
from pixelbert_dist.train.recall import recall_at_k


def _reference_candidates(cheap: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(TR, IR) candidate masks by Python's sort: score high first, then index low first."""
    num_images, num_texts = cheap.shape
    by_text = torch.zeros_like(cheap, dtype=torch.bool)
    by_image = torch.zeros_like(cheap, dtype=torch.bool)
    for i in range(num_images):
        for t in sorted(range(num_texts), key=lambda t: (-cheap[i, t].item(), t))[:k]:
            by_text[i, t] = True
    for t in range(num_texts):
        for i in sorted(range(num_images), key=lambda i: (-cheap[i, t].item(), i))[:k]:
            by_image[i, t] = True
    return by_text, by_image


def _ir_candidates_over_ranks(cheap: torch.Tensor, k: int, shards: list[torch.Tensor]) -> torch.Tensor:
    """IR candidates assembled from each rank's share, as ``t2i_candidates`` merges them."""
    num_images = cheap.shape[0]
    parts = [local_t2i_best(cheap[s], s, min(k, num_images), num_images) for s in shards]
    chosen = merge_t2i_best(parts, min(k, num_images))
    mask = torch.zeros_like(cheap, dtype=torch.bool)
    for t in range(cheap.shape[1]):
        mask[chosen[:, t][chosen[:, t] < num_images], t] = True
    return mask


@pytest.mark.parametrize("ranks", [1, 2, 3])
@pytest.mark.parametrize("k", [3, 7, 50])
def test_candidates_equal_a_plain_sort_of_the_whole_matrix(ranks, k):
    gen = torch.Generator().manual_seed(10 * ranks + k)
    cheap = torch.randint(0, 3, (7, 20), generator=gen).float()  # many ties
    order = torch.randperm(7, generator=gen)
    shards = [order[r::ranks] for r in range(ranks)]  # rows in any order, a rank may hold < k
    by_text, by_image = _reference_candidates(cheap, k)
    assert torch.equal(i2t_candidates(cheap[order], k), by_text[order])
    assert torch.equal(_ir_candidates_over_ranks(cheap, k, shards), by_image)
    assert int(by_text.sum()) == 7 * min(k, 20) and int(by_image.sum()) == 20 * min(k, 7)


def test_recalls_rank_each_direction_among_its_own_candidates():
    gen = torch.Generator().manual_seed(0)
    owner = torch.tensor([i // 3 for i in range(36)])  # 12 images, 3 captions each
    cheap, full = torch.randn(12, 36, generator=gen), torch.randn(12, 36, generator=gen)
    by_text, by_image = _reference_candidates(cheap, 10)
    got = sharded_recall(
        torch.arange(12), candidates_only(full, by_text), owner, 12, t2i_rows=candidates_only(full, by_image)
    )
    tr = recall_at_k(candidates_only(full, by_text), owner)
    ir = recall_at_k(candidates_only(full, by_image), owner)
    assert {k: v for k, v in got.items() if k.startswith("i2t")} == {k: v for k, v in tr.items() if k.startswith("i2t")}
    assert {k: v for k, v in got.items() if k.startswith("t2i")} == {k: v for k, v in ir.items() if k.startswith("t2i")}
    # a positive outside the candidates is a miss, never a hit by index order among the -inf
    everything = torch.ones_like(by_text)
    assert sharded_recall(torch.arange(12), full, owner, 12) == sharded_recall(
        torch.arange(12), candidates_only(full, everything), owner, 12, t2i_rows=candidates_only(full, everything)
    )


def test_thinned_pixels_are_evenly_spaced_valid_ones():
    pixels = torch.arange(2 * 6, dtype=torch.float).view(2, 6, 1)
    mask = torch.tensor([[True] * 6, [True, True, True, False, False, False]])
    tokens, valid = thinned_pixels(pixels, mask, 4)
    assert tokens[0, :, 0].tolist() == [0, 2, 3, 5]  # linspace(0, 5, 4) rounded
    assert tokens[1, :3, 0].tolist() == [6, 7, 8] and valid[1].tolist() == [True, True, True, False]
