"""Image-text retrieval: the Karpathy split reader and hard-negative mining (recall@K
lives in ``pixelbert_dist.train.recall``, shared with pre-training's probe)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from pixelbert_dist.data.builders.common import load_json


class KarpathyFormatError(ValueError):
    """A Karpathy split file that cannot be read, naming the file and the image."""


@dataclass(frozen=True)
class RetrievalImage:
    image_id: int  # cocoid for COCO, else imgid
    filename: str  # e.g. "COCO_val2014_000000391895.jpg" or "1000092795.jpg"
    filepath: str | None  # COCO's sub-folder ("val2014"); Flickr30K has none
    split: str
    captions: tuple[str, ...]
    dataset: str = "coco"  # the file's "dataset": with image_id, the shard key (coco391895)

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
    return RetrievalImage(
        image_id, filename, filepath if isinstance(filepath, str) else None, split, tuple(captions), dataset
    )


def read_karpathy_split(path: str | Path, split: str | Iterable[str]) -> list[RetrievalImage]:
    """Images of ``dataset_{coco,flickr30k}.json`` whose ``split`` is ``split`` (or one of
    several, e.g. ``("train", "restval")`` for the usual COCO training set), file order."""
    path = Path(path)
    splits = {split} if isinstance(split, str) else set(split)
    data = load_json(path, KarpathyFormatError)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise KarpathyFormatError(f"{path}: expected an object with an 'images' list (the Karpathy split format)")
    dataset = str(data.get("dataset", "coco"))  # as make_shards.py coco --karpathy reads it
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


def sample_negatives(
    text_to_image, images: Sequence[int], n: int, generator: torch.Generator | None = None
) -> torch.Tensor:
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
