"""Image helpers shared by every decode backend (DALI, nvjpeg, PIL).

Keeping the size rule, the normalisation constants, the padding rule and the caption
flip in one place is what makes the backends interchangeable: they differ only in who
decodes and resizes, never in what the batch looks like.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch

# ImageNet statistics in 0..255 units (the CNN's init was trained with them).
MEAN_255 = (0.485 * 255.0, 0.456 * 255.0, 0.406 * 255.0)
STD_255 = (0.229 * 255.0, 0.224 * 255.0, 0.225 * 255.0)
PAD_MULTIPLE = 64  # the CNN + 2x2 max-pool downsample by 64


def resized_size(height: int, width: int, shorter: int, max_size: int) -> tuple[int, int]:
    """(h, w) after the paper's rule: shorter side -> ``shorter`` unless the longer side
    would then exceed ``max_size``, in which case the longer side -> ``max_size``.

    Rounds to nearest (half up), which is what DALI's ``resize(resize_shorter=,
    max_size=)`` does; the tests check the two agree on odd sizes.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    scale = shorter / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return (max(1, math.floor(height * scale + 0.5)), max(1, math.floor(width * scale + 0.5)))


def round_up(value: int, multiple: int = PAD_MULTIPLE) -> int:
    return -(-value // multiple) * multiple


def padded_batch_size(sizes) -> tuple[int, int]:
    """The (H, W) a batch is padded to: the largest valid sizes rounded up to x64."""
    sizes = np.asarray(sizes).reshape(-1, 2)
    return round_up(int(sizes[:, 0].max())), round_up(int(sizes[:, 1].max()))


def padding_fraction(image_sizes, padded_hw) -> float:
    """Padded pixels / all pixels of a batch (0 = no waste)."""
    sizes = torch.as_tensor(image_sizes).reshape(-1, 2).to(torch.float64)
    total = sizes.shape[0] * float(padded_hw[0]) * float(padded_hw[1])
    return float(1.0 - (sizes[:, 0] * sizes[:, 1]).sum().item() / total)


def normalize_hwc_uint8(image: torch.Tensor) -> torch.Tensor:
    """uint8/float HWC (0..255) -> float32 CHW normalised with ImageNet mean/std."""
    mean = torch.tensor(MEAN_255, dtype=torch.float32, device=image.device).view(3, 1, 1)
    std = torch.tensor(STD_255, dtype=torch.float32, device=image.device).view(3, 1, 1)
    return (image.permute(2, 0, 1).to(torch.float32) - mean) / std


def pad_batch(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack CHW float images into [B,3,H,W], zero-padded bottom/right to x64.

    Zero is applied after normalisation, so padding reads as "mean colour" to the CNN
    and the model masks it out anyway using ``image_sizes``.
    """
    sizes = torch.tensor([[img.shape[1], img.shape[2]] for img in images], dtype=torch.int64)
    height, width = padded_batch_size(sizes.numpy())
    out = images[0].new_zeros((len(images), 3, height, width))
    for i, img in enumerate(images):
        out[i, :, : img.shape[1], : img.shape[2]] = img
    return out, sizes


_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def _swap_word(match: re.Match) -> str:
    word = match.group(0)
    swapped = "right" if word.lower() == "left" else "left"
    if word.isupper():
        return swapped.upper()
    if word[0].isupper():
        return swapped.capitalize()
    return swapped


def swap_left_right(text: str) -> str:
    """The caption of a horizontally flipped image: 'left' <-> 'right' (whole words,
    case kept). Without this a flip would teach the model wrong spatial words."""
    return _LEFT_RIGHT.sub(_swap_word, text)
