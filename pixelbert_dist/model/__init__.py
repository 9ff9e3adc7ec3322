"""Pixel-BERT: the model, its presets and weight loading."""

from .config import BACKBONES, PixelBertConfig
from .flops import training_flops_per_sample
from .pixelbert import PixelBert
from .presets import build_model, list_presets, preset_config, register_preset
from .visual import DOWNSAMPLE, feature_mask, sample_pixels
from .weights import LoadReport, load_bert_checkpoint, load_torchvision_backbone, load_visual_weights

__all__ = [
    "BACKBONES",
    "DOWNSAMPLE",
    "LoadReport",
    "PixelBert",
    "PixelBertConfig",
    "build_model",
    "feature_mask",
    "list_presets",
    "load_bert_checkpoint",
    "load_torchvision_backbone",
    "load_visual_weights",
    "preset_config",
    "register_preset",
    "sample_pixels",
    "training_flops_per_sample",
]
