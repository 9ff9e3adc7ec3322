"""Training FLOPs per sample, counted by torch's FlopCounterMode on the meta device (no
memory, no compute), and the same count in closed form for the MFU meter's every batch."""

from __future__ import annotations

import functools
import math

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import PixelBertConfig
from .pixelbert import PixelBert
from .visual import DOWNSAMPLE, build_backbone, trunk_forward


def _meta_batch(cfg: PixelBertConfig, image_hw: tuple[int, int], text_len: int, batch: int) -> dict:
    # No mlm_labels: the MLM head runs on the masked tokens only, a count that boolean
    # indexing can't know on meta tensors, so the head is added analytically below.
    ids = torch.ones(batch, text_len, dtype=torch.long)
    return {
        "images": torch.zeros(batch, 3, *image_hw),
        "image_sizes": torch.tensor([image_hw] * batch),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "itm_labels": torch.zeros(batch, dtype=torch.long),
    }


def training_flops_per_sample(
    cfg: PixelBertConfig,
    image_hw: tuple[int, int] = (800, 1344),
    text_len: int = 40,
    num_pixels: int | None = None,
    mlm_fraction: float = 0.15,
) -> float:
    """Forward + backward FLOPs of one training sample.

    ``num_pixels``: feature pixels kept by random sampling (None = the config's
    pixel_sample_size; 0 = every pixel). The MLM vocabulary projection is added
    analytically for ``mlm_fraction`` of the text tokens (3x: forward + two backward matmuls).
    """
    if num_pixels is not None:
        cfg = cfg.replace(pixel_sample_size=num_pixels)
    with torch.device("meta"):
        model = PixelBert(cfg.replace(activation_checkpointing="none"))
        batch = {k: v.to("meta") for k, v in _meta_batch(cfg, image_hw, text_len, 1).items()}
    model.train()
    counter = FlopCounterMode(display=False)
    with counter:
        model(batch)["loss"].backward()
    mlm_head = 3 * 2 * mlm_fraction * text_len * cfg.hidden_size * (cfg.hidden_size + cfg.vocab_size)
    return float(counter.get_total_flops() + mlm_head)


@functools.lru_cache(maxsize=None)
def _cnn_training_flops(backbone: str, image_hw: tuple[int, int]) -> float:
    """Forward + backward FLOPs of the CNN trunk on one image, counted once per (trunk, size)."""
    cfg = PixelBertConfig(backbone=backbone)
    with torch.device("meta"):
        trunk = build_backbone(cfg)
        images = torch.zeros(1, 3, *image_hw)
    counter = FlopCounterMode(display=False)
    with counter:
        trunk_forward(trunk, images).sum().backward()
    return float(counter.get_total_flops())


def training_flops_analytic(
    cfg: PixelBertConfig,
    image_hw: tuple[int, int],
    text_len: int,
    num_pixels: int | None = None,
    mlm_fraction: float = 0.15,
) -> float:
    """What ``training_flops_per_sample`` counts, in closed form (the CNN trunk counted once
    per image size and cached), cheap enough for every batch: the MFU meter charges each
    batch at its own padded size, text length and sampled pixels."""
    stride = DOWNSAMPLE if cfg.extra_pool else DOWNSAMPLE // 2
    grid = math.ceil(image_hw[0] / stride) * math.ceil(image_hw[1] / stride)
    sample = cfg.pixel_sample_size if num_pixels is None else num_pixels
    pixels = min(sample, grid) if sample else grid
    d, length = cfg.hidden_size, text_len + pixels
    layer = 2 * length * d * (4 * d + 2 * cfg.intermediate_size) + 4 * length * length * d  # matmuls + attention
    forward = cfg.num_layers * layer + 2 * pixels * cfg.backbone_channels * d + 2 * d * d + 2 * d * 2
    mlm_head = 3 * 2 * mlm_fraction * text_len * d * (d + cfg.vocab_size)
    return _cnn_training_flops(cfg.backbone, tuple(image_hw)) + 3 * forward + mlm_head


def pair_forward_flops(
    cfg: PixelBertConfig, image_hw: tuple[int, int], text_len: int, max_pixels: int | None = None
) -> float:
    """Forward FLOPs of scoring one (image, caption) pair in single-stream retrieval once the
    image's pixel tokens exist: the transformer over text + every feature pixel (at most
    ``max_pixels``: two-stage retrieval's first stage), the pooler and the ITM head (the CNN
    and the pixel projection are counted per image, not per pair)."""
    stride = DOWNSAMPLE if cfg.extra_pool else DOWNSAMPLE // 2
    pixels = math.ceil(image_hw[0] / stride) * math.ceil(image_hw[1] / stride)
    pixels = pixels if max_pixels is None else min(pixels, max_pixels)
    d, length = cfg.hidden_size, text_len + pixels
    layer = 2 * length * d * (4 * d + 2 * cfg.intermediate_size) + 4 * length * length * d
    return cfg.num_layers * layer + 2 * d * d + 2 * d * 2


def retrieval_eval_flops(
    cfg: PixelBertConfig, image_hw: tuple[int, int], text_len: int, num_images: int, num_texts: int
) -> float:
    """Forward FLOPs of scoring every pair of a retrieval test set: the transformer per pair,
    the CNN (forward ~ a third of its training FLOPs) and the pixel projection per image."""
    stride = DOWNSAMPLE if cfg.extra_pool else DOWNSAMPLE // 2
    pixels = math.ceil(image_hw[0] / stride) * math.ceil(image_hw[1] / stride)
    per_image = (
        _cnn_training_flops(cfg.backbone, tuple(image_hw)) / 3 + 2 * pixels * cfg.backbone_channels * cfg.hidden_size
    )
    return num_images * num_texts * pair_forward_flops(cfg, image_hw, text_len) + num_images * per_image
