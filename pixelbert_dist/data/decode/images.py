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
import torch.utils.data

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
    """uint8/float HWC (0..255) -> float32 CHW normalised with ImageNet mean/std (a new
    tensor: the caller's image is left as it is)."""
    return _normalize_(image.permute(2, 0, 1).to(torch.float32, copy=True))


def _normalize_(images: torch.Tensor) -> torch.Tensor:
    """float32 [..., 3, H, W] in 0..255, normalised in place with ImageNet mean/std."""
    mean = torch.tensor(MEAN_255, dtype=torch.float32, device=images.device).view(3, 1, 1)
    std = torch.tensor(STD_255, dtype=torch.float32, device=images.device).view(3, 1, 1)
    return images.sub_(mean).div_(std)


def _batch_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised batch; inside a DataLoader worker it is made in shared memory (as
    ``default_collate`` makes its batches), so handing it to the rank's process copies nothing."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(nbytes)).view(shape)


def pad_pixels(images: list[np.ndarray], normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """HWC uint8 images -> one [B,3,H,W] batch padded with zeros to x64, and its sizes.

    ``normalize``: the float32 batch of ``pad_batch`` over ``normalize_hwc_uint8`` images
    (the same numbers), each image converted and normalised in its slot. Without it, the
    uint8 batch that ``normalize_padded`` turns into that float batch later, on the device:
    a quarter of the bytes to hand over, pin and copy to a GPU.
    """
    sizes = torch.tensor([img.shape[:2] for img in images], dtype=torch.int64).reshape(-1, 2)
    shape = (len(images), 3, *padded_batch_size(sizes.numpy()))
    out = _batch_buffer(shape, torch.float32 if normalize else torch.uint8)
    slots = out.numpy()  # numpy reads PIL's read-only arrays without a copy (torch would warn)
    for i, img in enumerate(images):
        height, width = img.shape[:2]
        slots[i, :, :height, :width] = img.transpose(2, 0, 1)  # uint8 -> float32 is exact
        if normalize:
            _normalize_(out[i, :, :height, :width])
        # only the padding is zeroed: a memset of the whole fresh batch cost ~13 ms an image
        out[i, :, height:].zero_()
        out[i, :, :height, width:].zero_()
    return out, sizes


def normalize_padded(pixels: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """A uint8 batch of ``pad_pixels`` -> its float32 batch (the same numbers), on the
    device it lies on: the whole batch at once, then the padding zeroed (a few kernels
    on a GPU, whatever the batch size)."""
    out = _normalize_(pixels.to(torch.float32))
    sizes = sizes.to(pixels.device, non_blocking=True)
    rows = torch.arange(out.shape[2], device=out.device) < sizes[:, :1]
    cols = torch.arange(out.shape[3], device=out.device) < sizes[:, 1:]
    return out.masked_fill_(~(rows[:, None, :, None] & cols[:, None, None, :]), 0.0)


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
