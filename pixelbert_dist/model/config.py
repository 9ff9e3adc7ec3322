"""PixelBertConfig: every architectural choice of the model in one dataclass."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Literal

from pixelbert_dist.config import ConfigError

# CNN trunks as torchvision ResNet arguments: (block, layers, groups, width_per_group).
BACKBONES = {
    "resnet10": ("basic", [1, 1, 1, 1], 1, 64),  # tiny preset: fast on a CPU
    "resnet18": ("basic", [2, 2, 2, 2], 1, 64),
    "resnet50": ("bottleneck", [3, 4, 6, 3], 1, 64),
    "resnext101_32x8d": ("bottleneck", [3, 4, 23, 3], 32, 8),
    "resnext152_32x8d": ("bottleneck", [3, 8, 36, 3], 32, 8),
}
Backbone = Literal[tuple(BACKBONES)]  # a run config's model.overrides.backbone is checked against it
Checkpointing = Literal["none", "transformer", "all"]
CHECKPOINTING = typing.get_args(Checkpointing)


@dataclass
class PixelBertConfig:
    # visual side
    backbone: Backbone = "resnet50"
    extra_pool: bool = True  # the paper's 2x2 max-pool: 64x downsampling in all
    freeze_bn: bool = True  # BatchNorm as FrozenBatchNorm2d (small per-GPU batches)
    channels_last: bool = True
    pixel_sample_size: int = 100  # feature pixels kept per image in pre-training; 0 = all
    # text side and transformer (BERT-base by default)
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    # execution
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"  # "sdpa" (fused kernels on GPU) or "eager"
    # Recompute activations in backward instead of keeping them: "none", "transformer"
    # (every encoder layer) or "all" (also the CNN's stem and four stages).
    activation_checkpointing: Checkpointing = "none"
    # losses
    mlm_weight: float = 1.0
    itm_weight: float = 1.0
    extra: dict = field(default_factory=dict)  # free-form notes carried into exports

    def __post_init__(self):  # ConfigError: the values come from model.overrides or an export
        if self.backbone not in BACKBONES:
            raise ConfigError(f"model.backbone={self.backbone!r} unknown; choose from {sorted(BACKBONES)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}"
            )
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ConfigError(f"model.attn_implementation={self.attn_implementation!r}: use 'sdpa' or 'eager'")
        if isinstance(self.activation_checkpointing, bool):  # the former on/off switch (old exports)
            self.activation_checkpointing = "transformer" if self.activation_checkpointing else "none"
        if self.activation_checkpointing not in CHECKPOINTING:
            raise ConfigError(
                f"model.activation_checkpointing={self.activation_checkpointing!r}: use one of {list(CHECKPOINTING)}"
            )
        if self.pixel_sample_size < 0:
            raise ConfigError("model.pixel_sample_size must be >= 0 (0 keeps every pixel)")

    @property
    def backbone_channels(self) -> int:
        block = BACKBONES[self.backbone][0]
        return 512 if block == "basic" else 2048

    def replace(self, **overrides) -> "PixelBertConfig":
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown model config key(s): {sorted(unknown)}")
        return dataclasses.replace(self, **overrides)
