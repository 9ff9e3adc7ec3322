"""Two-stage retrieval (``retrieval.rerank_k``): a cheap first stage picks the ``k`` best
candidates per query, the full model re-ranks only those.

The first stage is the same model's ITM margin with each image cut to
``retrieval.rerank_pixels`` feature pixels, evenly spaced among its valid ones. Pixel-BERT
is pre-trained that way (pixel random sampling: 100 feature pixels per image), so the
transformer knows a thinned image, and the sequence shrinks from text + every pixel (313
tokens for R50 at 800x1333) to text + a few dozen. A pooled text / pixel cosine would be
cheaper still, but this single-stream model never learns to align the two alone.

Selection follows ALBEF's two-stage evaluation: TR ranks, for each image, its ``k`` best
captions by the first stage; IR ranks, for each caption, its ``k`` best images. A pair
outside a query's candidates scores -inf for that query (a miss: ``k`` >= 10, so R@10 is
decided among scored candidates). Ties are broken by index, lower first, as everywhere in
``train.recall``. A pair picked by both directions runs through the full model once.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from pixelbert_dist.collectives import collective_device


def thinned_pixels(pixels: torch.Tensor, mask: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel tokens [B, keep', H] and mask [B, keep']: ``keep`` feature pixels per image,
    evenly spaced over its valid ones in raster order (fewer where it has fewer), so the
    result does not depend on the batch or on a random stream."""
    keep = min(keep, pixels.shape[1])
    index = torch.zeros(pixels.shape[0], keep, dtype=torch.long, device=pixels.device)
    valid = torch.zeros(pixels.shape[0], keep, dtype=torch.bool, device=pixels.device)
    for row in range(pixels.shape[0]):
        positions = mask[row].nonzero().flatten()
        n = min(keep, positions.numel())
        if n:
            spread = torch.linspace(0, positions.numel() - 1, n, device=pixels.device).round().long()
            index[row, :n], valid[row, :n] = positions[spread], True
    return pixels.gather(1, index[..., None].expand(-1, -1, pixels.shape[-1])), valid


def _best_by_score_then_index(scores: torch.Tensor, index: torch.Tensor, k: int, dim: int):
    """The ``k`` entries along ``dim`` with the highest score, equal scores lower index
    first (two stable sorts): (scores, index) of them, best first."""
    by_index = torch.sort(index, dim=dim, stable=True).indices
    scores, index = scores.gather(dim, by_index), index.gather(dim, by_index)
    by_score = torch.sort(scores, dim=dim, descending=True, stable=True).indices[(slice(None),) * dim + (slice(k),)]
    return scores.gather(dim, by_score), index.gather(dim, by_score)


def i2t_candidates(rows: torch.Tensor, k: int) -> torch.Tensor:
    """Bool [n, num_texts]: each row's ``k`` best captions by first-stage score (TR)."""
    texts = torch.arange(rows.shape[1]).expand_as(rows)
    _, best = _best_by_score_then_index(rows, texts, min(k, rows.shape[1]), dim=1)
    return torch.zeros_like(rows, dtype=torch.bool).scatter_(1, best, True)


def local_t2i_best(rows: torch.Tensor, images: torch.Tensor, k: int, num_images: int):
    """This rank's share of IR's candidates: for every caption, its ``k`` best images among
    ``images`` (rows ``rows``), as (scores, image indices) [k, num_texts]; a rank with
    fewer images pads with -inf and the index ``num_images`` (never chosen over a real one)."""
    rows = torch.cat([rows, torch.full((k, rows.shape[1]), float("-inf"))])
    index = torch.cat([images.long(), torch.full((k,), num_images)])[:, None].expand_as(rows)
    return _best_by_score_then_index(rows, index.contiguous(), k, dim=0)


def merge_t2i_best(parts: list[tuple[torch.Tensor, torch.Tensor]], k: int) -> torch.Tensor:
    """Every rank's ``local_t2i_best`` -> [k, num_texts] image indices: each caption's ``k``
    best images over all ranks (the index ``num_images`` where there are fewer images)."""
    scores = torch.cat([s for s, _ in parts])
    index = torch.cat([i for _, i in parts])
    return _best_by_score_then_index(scores, index, k, dim=0)[1]


def _all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [tensor]
    moved = tensor.to(collective_device())
    out = [torch.empty_like(moved) for _ in range(dist.get_world_size())]
    dist.all_gather(out, moved)
    return [t.cpu() for t in out]


def t2i_candidates(
    rows: torch.Tensor, images: torch.Tensor, k: int, num_images: int, all_gather: Callable = _all_gather
) -> torch.Tensor:
    """Bool [n, num_texts]: whether this rank's image (row) is among a caption's ``k`` best
    images over every rank (IR). One all-gather of [k, num_texts] scores and indices."""
    k = min(k, num_images)
    scores, index = local_t2i_best(rows, images, k, num_images)
    chosen = merge_t2i_best(list(zip(all_gather(scores), all_gather(index))), k)  # [k, num_texts]
    local = torch.full((num_images + 1,), -1, dtype=torch.long)
    local[images] = torch.arange(images.numel())
    row = local[chosen]  # the local row of each chosen image, -1 when another rank holds it
    texts = torch.arange(rows.shape[1]).expand_as(chosen)
    mask = torch.zeros(images.numel() + 1, rows.shape[1], dtype=torch.bool)
    mask[row.flatten(), texts.flatten()] = True  # row -1 lands in the spare last row
    return mask[:-1]


def candidates_only(full: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Full-model scores where ``chosen``, -inf elsewhere (never ahead of a candidate)."""
    return full.masked_fill(~chosen, float("-inf"))
