"""Training FLOPs per sample, counted by torch's FlopCounterMode on the meta device (no
memory, no compute), for the MFU meter."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import PixelBertConfig
from .pixelbert import PixelBert


def _meta_batch(cfg: PixelBertConfig, image_hw: tuple[int, int], text_len: int, batch: int) -> dict:
    # No mlm_labels: the MLM head runs on the masked tokens only, a count that boolean
    # indexing can't know on meta tensors, so the head is added analytically below.
    ids = torch.ones(batch, text_len, dtype=torch.long)
    return {"images": torch.zeros(batch, 3, *image_hw), "image_sizes": torch.tensor([image_hw] * batch),
            "input_ids": ids, "attention_mask": torch.ones_like(ids),
            "itm_labels": torch.zeros(batch, dtype=torch.long)}


def training_flops_per_sample(cfg: PixelBertConfig, image_hw: tuple[int, int] = (800, 1344),
                              text_len: int = 40, num_pixels: int | None = None,
                              mlm_fraction: float = 0.15) -> float:
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
