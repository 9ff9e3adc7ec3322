"""Named model presets (a registry, as timm and open_clip keep them).

torch loads in ``build_model`` only: listing the presets and their configs
(``pretrain.py --list-presets``) answers without it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from .config import PixelBertConfig

if TYPE_CHECKING:
    import torch

    from .pixelbert import PixelBert

_PRESETS: dict[str, Callable[[], PixelBertConfig]] = {}


def register_preset(name: str):
    def wrap(fn: Callable[[], PixelBertConfig]):
        if name in _PRESETS:
            raise ValueError(f"model preset {name!r} is registered twice")
        _PRESETS[name] = fn
        return fn

    return wrap


def list_presets() -> list[str]:
    return sorted(_PRESETS)


def preset_config(name: str, **overrides) -> PixelBertConfig:
    if name not in _PRESETS:
        raise KeyError(f"unknown model preset {name!r}; registered: {list_presets()}")
    return _PRESETS[name]().replace(**overrides)


def build_model(name: str, device: str | torch.device | None = None, **overrides) -> PixelBert:
    """Build preset ``name`` with config overrides; ``device="meta"`` allocates nothing."""
    import torch

    from .pixelbert import PixelBert

    cfg = preset_config(name, **overrides)
    with torch.device(device or "cpu"):
        return PixelBert(cfg)


@register_preset("pixelbert-r50")
def _r50() -> PixelBertConfig:
    """The paper's analysis model: ResNet-50 + BERT-base, images 800 / 1333."""
    return PixelBertConfig(backbone="resnet50")


@register_preset("pixelbert-x152")
def _x152() -> PixelBertConfig:
    """The paper's best model: ResNeXt-152 32x8d + BERT-base, images 600 / 1000."""
    return PixelBertConfig(backbone="resnext152_32x8d")


@register_preset("tiny")
def _tiny() -> PixelBertConfig:
    """For tests and the CPU demo: a ResNet-10 trunk and a 2-layer 128-wide transformer
    over the project's 512-token synthetic vocabulary."""
    return PixelBertConfig(
        backbone="resnet10",
        vocab_size=512,
        hidden_size=128,
        num_layers=2,
        num_heads=4,
        intermediate_size=256,
        max_position_embeddings=64,
        freeze_bn=False,
        channels_last=False,
        pixel_sample_size=100,
    )


@register_preset("tiny-minilm")
def _tiny_minilm() -> PixelBertConfig:
    """The CPU demo: a ResNet-10 trunk and the shape of all-MiniLM-L6-v2 (6 layers, 384
    wide, BERT uncased vocab), so a real pre-trained text encoder can initialise it, as the
    paper initialises from BERT-base (model.bert_dir)."""
    return PixelBertConfig(
        backbone="resnet10",
        hidden_size=384,
        num_layers=6,
        num_heads=12,
        intermediate_size=1536,
        freeze_bn=False,
        channels_last=False,
    )
