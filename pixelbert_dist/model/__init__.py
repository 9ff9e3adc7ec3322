"""Pixel-BERT: the model, its presets and weight loading.

The re-exports load on first use (PEP 562): the preset registry (``--list-presets``)
and the model config must answer without importing torch.
"""

from __future__ import annotations

import importlib

_MODULE_OF = {
    "BACKBONES": "config",
    "PixelBertConfig": "config",
    "training_flops_per_sample": "flops",
    "PixelBert": "pixelbert",
    "build_model": "presets",
    "list_presets": "presets",
    "preset_config": "presets",
    "register_preset": "presets",
    "DOWNSAMPLE": "visual",
    "feature_mask": "visual",
    "sample_pixels": "visual",
    "LoadReport": "weights",
    "load_bert_checkpoint": "weights",
    "load_torchvision_backbone": "weights",
    "load_visual_weights": "weights",
}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
