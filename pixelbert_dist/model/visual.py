"""Visual side: a torchvision ResNet trunk, the extra 2x2 max-pool, the pixel mask, pixel
random sampling, and the visual embedding v_hat = LN(W v) + s_v."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops.misc import FrozenBatchNorm2d

from .config import BACKBONES, PixelBertConfig

DOWNSAMPLE = 64  # ResNet's 32x and the paper's extra 2x2 max-pool: pad images to multiples of this


class FrozenBN(FrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d (same buffer names) that computes in the input's
    dtype: DeepSpeed's bf16/fp16 casts parameters, not buffers, and fp32 statistics would
    otherwise turn bf16 activations back into fp32 before the next bf16 conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.to(x.dtype)[None, :, None, None] + bias.to(x.dtype)[None, :, None, None]


def build_backbone(cfg: PixelBertConfig) -> ResNet:
    """A torchvision ResNet without avgpool/fc; its parameter names match torchvision
    weight files, so `load_state_dict` of an ImageNet checkpoint works directly."""
    block, layers, groups, width = BACKBONES[cfg.backbone]
    norm = FrozenBN if cfg.freeze_bn else nn.BatchNorm2d
    net = ResNet(BasicBlock if block == "basic" else Bottleneck, layers, groups=groups,
                 width_per_group=width, norm_layer=norm)
    del net.avgpool, net.fc
    return net


def trunk_forward(net: ResNet, images: torch.Tensor) -> torch.Tensor:
    x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def feature_mask(image_sizes: torch.Tensor, grid: tuple[int, int], stride: int = DOWNSAMPLE) -> torch.Tensor:
    """[B, h*w] bool: a feature pixel is valid when it covers some valid image pixel."""
    rows = torch.arange(grid[0], device=image_sizes.device)
    cols = torch.arange(grid[1], device=image_sizes.device)
    valid_h = (image_sizes[:, 0] + stride - 1) // stride
    valid_w = (image_sizes[:, 1] + stride - 1) // stride
    mask = (rows[None, :, None] < valid_h[:, None, None]) & (cols[None, None, :] < valid_w[:, None, None])
    return mask.flatten(1)


def sample_pixels(mask: torch.Tensor, k: int, generator: torch.Generator | None = None):
    """Pick k feature pixels per image uniformly without replacement among the valid ones.

    Vectorised: every valid pixel gets a random key in [0, 1), every invalid one -1; the
    top-k keys are a uniform sample of the valid pixels. Where an image has fewer than k
    valid pixels the rest of the picks are invalid ones, flagged False in the returned mask.
    Returns (indices [B, k'], mask [B, k']) with k' = min(k, number of pixels).
    """
    k = min(k, mask.shape[1])
    keys = torch.rand(mask.shape, device=mask.device, generator=generator)
    keys = keys.masked_fill(~mask, -1.0)
    index = keys.topk(k, dim=1).indices
    return index, mask.gather(1, index)


class VisualEmbedding(nn.Module):
    """CNN features -> [B, N, hidden] pixel tokens plus their validity mask."""

    def __init__(self, cfg: PixelBertConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg)
        self.proj = nn.Linear(cfg.backbone_channels, cfg.hidden_size)
        # LayerNorm brings the projected CNN features to the scale of the LN-ed text
        # embeddings; s_v is the paper's one semantic vector shared by every pixel.
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.semantic = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, images: torch.Tensor, image_sizes: torch.Tensor | None, sample: int = 0):
        if self.cfg.channels_last:
            # Only the input: a channels_last input makes cuDNN pick NHWC kernels, while
            # the weights stay contiguous (DeepSpeed views every parameter as flat bytes).
            images = images.contiguous(memory_format=torch.channels_last)
        feats = trunk_forward(self.backbone, images)
        if self.cfg.extra_pool:
            feats = F.max_pool2d(feats, kernel_size=2, stride=2, ceil_mode=True)
        grid = feats.shape[-2:]
        feats = feats.flatten(2).transpose(1, 2)  # [B, h*w, C]
        if image_sizes is None:
            mask = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
        else:
            mask = feature_mask(image_sizes, grid, DOWNSAMPLE if self.cfg.extra_pool else DOWNSAMPLE // 2)
        if sample:
            # Sample before projecting: the projection then runs on k pixels, not all.
            index, mask = sample_pixels(mask, sample)
            feats = feats.gather(1, index[..., None].expand(-1, -1, feats.shape[-1]))
        tokens = self.LayerNorm(self.proj(feats)) + self.semantic
        return self.dropout(tokens), mask
