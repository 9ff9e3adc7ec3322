"""Pixel-BERT: the model, its presets and weight loading.

The re-exports load on first use (PEP 562): the preset registry (``--list-presets``)
and the model config must answer without importing torch.
"""

from __future__ import annotations

from pixelbert_dist.lazy import lazy_exports

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
__all__, __getattr__ = lazy_exports(__name__, _MODULE_OF)
