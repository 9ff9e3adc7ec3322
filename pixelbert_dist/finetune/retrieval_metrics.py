"""Image-text retrieval: the Karpathy split reader, recall@K and hard-negative mining.

Naming as in the paper's tables: TR (text retrieval) ranks the captions for each image
(``i2t``), IR (image retrieval) ranks the images for each caption (``t2i``).

Ties count against the model: a negative that scores the same as the positive is ranked
ahead of it. A model that gives every pair the same score therefore gets R@K = 0 (not an
arbitrary value that depends on the sort's tie order), which keeps a degenerate model
from looking good on small synthetic sets.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from pixelbert_dist.data.builders.common import load_json

# Score rows handled at once; bounds memory at about 4 * chunk * num_texts bytes per mask.
_CHUNK = 256


class KarpathyFormatError(ValueError):
    """A Karpathy split file that cannot be read, naming the file and the image."""


@dataclass(frozen=True)
class RetrievalImage:
    image_id: int                 # cocoid for COCO, else imgid
    filename: str                 # e.g. "COCO_val2014_000000391895.jpg" or "1000092795.jpg"
    filepath: str | None          # COCO's sub-folder ("val2014"); Flickr30K has none
    split: str
    captions: tuple[str, ...]
    dataset: str = "coco"         # the file's "dataset": with image_id, the shard key (coco391895)

    @property
    def relative_path(self) -> str:
        return f"{self.filepath}/{self.filename}" if self.filepath else self.filename


def _read_image(entry, where: str, dataset: str) -> RetrievalImage:
    if not isinstance(entry, dict):
        raise KarpathyFormatError(f"{where}: expected an object")
    sentences = entry.get("sentences")
    filename, split = entry.get("filename"), entry.get("split")
    if not isinstance(filename, str) or not isinstance(split, str):
        raise KarpathyFormatError(f"{where}: 'filename' and 'split' must be strings")
    if not isinstance(sentences, list) or not sentences:
        raise KarpathyFormatError(f"{where} ({filename}): 'sentences' must be a non-empty list")
    captions = []
    for j, sent in enumerate(sentences):
        raw = sent.get("raw") if isinstance(sent, dict) else None
        if not isinstance(raw, str) or not raw.strip():
            raise KarpathyFormatError(f"{where} ({filename}): sentence #{j} has no 'raw' text")
        captions.append(raw.strip())
    image_id = entry.get("cocoid", entry.get("imgid"))
    if not isinstance(image_id, int) or isinstance(image_id, bool):
        raise KarpathyFormatError(f"{where} ({filename}): needs an integer 'cocoid' or 'imgid'")
    filepath = entry.get("filepath")
    return RetrievalImage(image_id, filename, filepath if isinstance(filepath, str) else None,
                          split, tuple(captions), dataset)


def read_karpathy_split(path: str | Path, split: str | Iterable[str]) -> list[RetrievalImage]:
    """Images of ``dataset_{coco,flickr30k}.json`` whose ``split`` is ``split`` (or one of
    several, e.g. ``("train", "restval")`` for the usual COCO training set), file order."""
    path = Path(path)
    splits = {split} if isinstance(split, str) else set(split)
    data = load_json(path, KarpathyFormatError)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise KarpathyFormatError(f"{path}: expected an object with an 'images' list "
                                  "(the Karpathy split format)")
    dataset = str(data.get("dataset", "coco"))   # as make_shards.py coco --karpathy reads it
    images = [_read_image(entry, f"{path}: image #{i}", dataset) for i, entry in enumerate(data["images"])]
    chosen = [im for im in images if im.split in splits]
    if not chosen:
        found = sorted({im.split for im in images})
        raise KarpathyFormatError(f"{path}: no image in split(s) {sorted(splits)}; found {found}")
    return chosen


def flatten_captions(images: Sequence[RetrievalImage]) -> tuple[list[str], list[int]]:
    """All captions in order and, for each, the index of its image (``text_to_image``)."""
    texts, owner = [], []
    for i, image in enumerate(images):
        texts.extend(image.captions)
        owner.extend([i] * len(image.captions))
    return texts, owner


def _as_scores(scores, text_to_image) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.as_tensor(scores).detach().cpu()
    if not scores.is_floating_point():
        scores = scores.float()   # keep float32/bf16 as given: COCO 5K x 25K is 500 MB already
    owner = torch.as_tensor(text_to_image, dtype=torch.long).cpu()
    if scores.dim() != 2 or owner.shape != (scores.shape[1],):
        raise ValueError(f"scores must be [num_images, num_texts] and text_to_image "
                         f"[num_texts]; got {tuple(scores.shape)} and {tuple(owner.shape)}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    if owner.numel() and (owner.min() < 0 or owner.max() >= scores.shape[0]):
        raise ValueError("text_to_image holds an index outside [0, num_images)")
    counts = torch.bincount(owner, minlength=scores.shape[0])
    if (counts == 0).any():
        raise ValueError(f"image {int((counts == 0).nonzero()[0])} has no caption")
    return scores, owner


def retrieval_ranks(scores, text_to_image) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks: for each image, of its best caption among the other images' captions
    (``i2t``, [num_images]); for each caption, of its image among the others (``t2i``,
    [num_texts]). A rank counts the negatives scoring >= the positive."""
    scores, owner = _as_scores(scores, text_to_image)
    num_images = scores.shape[0]
    i2t = torch.empty(num_images, dtype=torch.long)
    for lo in range(0, num_images, _CHUNK):
        rows = scores[lo:lo + _CHUNK]
        positive = owner[None, :] == torch.arange(lo, lo + rows.shape[0])[:, None]
        best = rows.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
        i2t[lo:lo + rows.shape[0]] = ((rows >= best) & ~positive).sum(dim=1)
    t2i = torch.empty(owner.shape[0], dtype=torch.long)
    for lo in range(0, owner.shape[0], _CHUNK):
        cols = scores[:, lo:lo + _CHUNK]
        own = owner[lo:lo + _CHUNK]
        positive = torch.arange(num_images)[:, None] == own[None, :]
        target = cols.gather(0, own[None, :])
        t2i[lo:lo + cols.shape[1]] = ((cols >= target) & ~positive).sum(dim=0)
    return i2t, t2i


def recall_at_k(scores, text_to_image, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """R@K in percent for both directions and their sum ``rsum``.

    ``scores[i, t]`` is the model's score of image ``i`` with caption ``t`` (higher =
    better); ``text_to_image[t]`` the image caption ``t`` belongs to. An image is a hit at
    K when ANY of its captions is in the top K (the COCO/Flickr30K protocol)."""
    i2t, t2i = retrieval_ranks(scores, text_to_image)
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * (i2t < k).double().mean().item()
    for k in ks:
        out[f"t2i_r{k}"] = 100.0 * (t2i < k).double().mean().item()
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks)
    return out


def sample_negatives(text_to_image, images: Sequence[int], n: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` distinct random captions of OTHER images for each of ``images`` -> [B, n]
    caption indices (the paper draws 20 per pair for its hard-negative step)."""
    owner = torch.as_tensor(text_to_image, dtype=torch.long)
    out = torch.empty(len(images), n, dtype=torch.long)
    for row, image in enumerate(images):
        candidates = (owner != int(image)).nonzero().flatten()
        if candidates.numel() < n:
            raise ValueError(f"image {image}: only {candidates.numel()} negative captions, need {n}")
        pick = torch.randperm(candidates.numel(), generator=generator)[:n]
        out[row] = candidates[pick]
    return out


def hardest_negatives(scores, positives, k: int) -> torch.Tensor:
    """Indices [B, k] of the ``k`` highest-scoring candidates that are not positives.

    ``scores`` [B, N] are the (no-grad) scores of N candidate captions per row, e.g. the
    20 random negatives of ``sample_negatives``; ``positives`` is a bool [B, N] mask of
    candidates that must never be picked (or None). Ties go to the lower index, so the
    choice is deterministic. The caller re-scores only these with gradients (the paper
    back-propagates through the 5 hardest of 20)."""
    scores = torch.as_tensor(scores).detach()
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B, N], got {tuple(scores.shape)}")
    if positives is not None:
        mask = torch.as_tensor(positives, dtype=torch.bool, device=scores.device)
        if mask.shape != scores.shape:
            raise ValueError(f"positives mask {tuple(mask.shape)} != scores {tuple(scores.shape)}")
        available = (~mask).sum(dim=1)
        if (available < k).any():
            raise ValueError(f"a row has only {int(available.min())} negatives, need k={k}")
        scores = scores.float().masked_fill(mask, float("-inf"))
    elif scores.shape[1] < k:
        raise ValueError(f"only {scores.shape[1]} candidates per row, need k={k}")
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return order[:, :k]
