"""Image-text recall@K: the ranks of the positives and R@K in both directions.

Naming as in the paper's tables: TR (text retrieval) ranks the captions for each image
(``i2t``), IR (image retrieval) ranks the images for each caption (``t2i``).

Ranks are positions in the candidates sorted by score, highest first, as the reference
implementations compute them (ALBEF, ViLT, UNITER sort or top-k the score matrix and look
for the positive). Equal scores are ordered by index, lower first, as a stable sort does:
the references leave that order to their sort (``np.argsort(s)[::-1]``, ``torch.topk``),
so ties are where they may disagree with each other; this rule is deterministic. For
TR the rank is the position of the image's first caption in that order (its best one).
Scores are the raw ITM margin ``logit[match] - logit[no match]``: a log-probability in
fp32 rounds to exactly 0.0 for every margin above ~17 and would create ties a confident
model never made.

Shared by pre-training's R@1 probe (train.evaluate) and retrieval fine-tuning, so it
lives in the lower layer (torch only).
"""

from __future__ import annotations

from typing import Sequence

import torch

# Score rows handled at once; bounds memory at about 4 * chunk * num_texts bytes per mask.
_CHUNK = 256


def _as_scores(scores, text_to_image) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.as_tensor(scores).detach().cpu()
    if not scores.is_floating_point():
        scores = scores.float()  # keep float32/bf16 as given: COCO 5K x 25K is 500 MB already
    owner = torch.as_tensor(text_to_image, dtype=torch.long).cpu()
    if scores.dim() != 2 or owner.shape != (scores.shape[1],):
        raise ValueError(
            f"scores must be [num_images, num_texts] and text_to_image "
            f"[num_texts]; got {tuple(scores.shape)} and {tuple(owner.shape)}"
        )
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    if owner.numel() and (owner.min() < 0 or owner.max() >= scores.shape[0]):
        raise ValueError("text_to_image holds an index outside [0, num_images)")
    counts = torch.bincount(owner, minlength=scores.shape[0])
    if (counts == 0).any():
        raise ValueError(f"image {int((counts == 0).nonzero()[0])} has no caption")
    return scores, owner


def i2t_ranks(rows: torch.Tensor, row_images: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """TR ranks of the images ``row_images`` whose score rows are ``rows`` [n, num_texts]:
    the negatives ahead of each image's first caption in the sorted order."""
    text_index = torch.arange(owner.shape[0])
    positive = owner[None, :] == row_images[:, None]
    best = rows.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
    first = torch.where(positive & (rows == best), text_index, owner.shape[0]).amin(dim=1, keepdim=True)
    ahead = (rows > best) | ((rows == best) & (text_index[None, :] < first))
    return (ahead & ~positive).sum(dim=1)


def t2i_ahead(rows: torch.Tensor, row_images: torch.Tensor, owner: torch.Tensor, own_score: torch.Tensor):
    """For every caption, how many of the images ``row_images`` (score rows ``rows``) sort
    ahead of its own image, whose score is ``own_score`` [num_texts]. Summed over any
    split of the images into row blocks, this is the IR rank."""
    ahead = (rows > own_score[None, :]) | ((rows == own_score[None, :]) & (row_images[:, None] < owner[None, :]))
    return ahead.sum(dim=0)


def retrieval_ranks(scores, text_to_image) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks: for each image, the position of its first caption among all captions
    sorted by score (``i2t``, [num_images]); for each caption, the position of its image
    among all images (``t2i``, [num_texts]). Sorted highest first, equal scores by index
    (lower first), i.e. the positions a stable descending sort gives."""
    scores, owner = _as_scores(scores, text_to_image)
    num_images, num_texts = scores.shape
    own_score = scores.gather(0, owner[None, :])[0]
    i2t = torch.empty(num_images, dtype=torch.long)
    t2i = torch.zeros(num_texts, dtype=torch.long)
    for lo in range(0, num_images, _CHUNK):
        rows, images = scores[lo : lo + _CHUNK], torch.arange(lo, min(lo + _CHUNK, num_images))
        i2t[lo : lo + rows.shape[0]] = i2t_ranks(rows, images, owner)
        t2i += t2i_ahead(rows, images, owner, own_score)
    return i2t, t2i


def recall_from_ranks(i2t, t2i, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """R@K in percent from the ranks (see ``recall_at_k``)."""
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * (i2t < k).double().mean().item()
    for k in ks:
        out[f"t2i_r{k}"] = 100.0 * (t2i < k).double().mean().item()
    for d in ("i2t", "t2i"):
        out[f"{d}_mean"] = sum(out[f"{d}_r{k}"] for k in ks) / len(ks)
    out["r_mean"] = (out["i2t_mean"] + out["t2i_mean"]) / 2
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks)
    return out


def recall_at_k(scores, text_to_image, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """R@K in percent for both directions, each direction's mean (``i2t_mean``,
    ``t2i_mean``, ALBEF's txt_r_mean / img_r_mean), their mean ``r_mean`` and their sum
    ``rsum`` (UNITER's and the Pixel-BERT tables' RSUM).

    ``scores[i, t]`` is the model's score of image ``i`` with caption ``t`` (higher =
    better); ``text_to_image[t]`` the image caption ``t`` belongs to. An image is a hit at
    K when ANY of its captions is in the top K (the COCO/Flickr30K protocol)."""
    return recall_from_ranks(*retrieval_ranks(scores, text_to_image), ks)
