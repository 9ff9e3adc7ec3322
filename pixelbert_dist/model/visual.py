"""Visual side: a torchvision ResNet trunk, the extra 2x2 max-pool, the pixel mask, pixel
random sampling, and the visual embedding v_hat = LN(W v) + s_v."""

from __future__ import annotations

import contextlib
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules._functions import SyncBatchNorm as sync_batch_norm
from torch.utils.checkpoint import checkpoint
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops.misc import FrozenBatchNorm2d

from .config import BACKBONES, PixelBertConfig

DOWNSAMPLE = 64  # ResNet's 32x and the paper's extra 2x2 max-pool: pad images to multiples of this


class FrozenBN(FrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d (same buffer names) that computes in the input's
    dtype: DeepSpeed's bf16/fp16 casts parameters, not buffers, and fp32 statistics would
    otherwise turn bf16 activations back into fp32 before the next bf16 conv. One addcmul
    instead of ``x * scale + bias``: one activation-sized output instead of two (the
    product was a temporary as large as the input, the peak of a checkpointed block's
    recomputation), and the backward keeps only ``scale`` either way."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return torch.addcmul(bias.to(x.dtype)[None, :, None, None], x, scale.to(x.dtype)[None, :, None, None])


class BatchNorm(nn.BatchNorm2d):
    """nn.BatchNorm2d (same names) safe under mixed precision and activation checkpointing.

    DeepSpeed's bf16/fp16 casts parameters but keeps the running statistics in fp32, a mix
    that CPU batch_norm refuses ("expected scalar type BFloat16 but found Float"): the
    affine parameters (C values) are cast to the statistics' dtype instead, the mixed mode
    CPU and cuDNN kernels both take (low-precision activations in and out, fp32 statistics).
    A checkpointed stage runs forward twice; with ``recomputing`` set, the second run uses
    the batch statistics again with momentum 0, so the running ones are updated once (and
    the kernel saves the same tensors for backward, which checkpointing checks)."""

    recomputing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = _affine_in_stats_dtype(self)
        momentum = _stats_momentum(self)
        return F.batch_norm(x, self.running_mean, self.running_var, weight, bias, self.training, momentum, self.eps)


class SyncBatchNorm(nn.SyncBatchNorm):
    """torch's SyncBatchNorm (``train.sync_bn``: batch statistics over every rank) with
    BatchNorm's two guards: the affine parameters in the statistics' dtype, and
    ``recomputing``, set while a checkpointed stage is recomputed in backward, which uses
    the batch statistics again with momentum 0, so the running ones are updated once.
    torch's own module would update them twice (and count two batches). Every rank
    recomputes the same stages in the same order, so the recomputation's all-reduce
    meets its peers as the first forward's did."""

    recomputing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        weight, bias = _affine_in_stats_dtype(self)
        momentum = _stats_momentum(self)
        dist = torch.distributed
        group = self.process_group or (dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
        world = dist.get_world_size(group) if group is not None else 1
        if not self.training or world == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, weight, bias, self.training, momentum, self.eps)
        if x.device.type == "cpu":
            raise ValueError("SyncBatchNorm across ranks needs CUDA inputs (train.sync_bn is for GPU runs)")
        stats = (self.running_mean, self.running_var)
        return sync_batch_norm.apply(x, weight, bias, *stats, self.eps, momentum, group, world)


def sync_batchnorms(module: nn.Module, process_group=None) -> nn.Module:
    """``module`` with every BatchNorm replaced by ``SyncBatchNorm`` (parameters and running
    statistics shared, not copied): torch's ``convert_sync_batchnorm`` makes its own class."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        synced = SyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats, process_group
        )
        synced.weight, synced.bias = module.weight, module.bias
        synced.running_mean, synced.running_var = module.running_mean, module.running_var
        synced.num_batches_tracked = module.num_batches_tracked
        synced.train(module.training)
        module = synced
    for name, child in list(module.named_children()):
        module.add_module(name, sync_batchnorms(child, process_group))
    return module


def _affine_in_stats_dtype(norm: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = norm.running_mean.dtype
    return norm.weight.to(dtype), norm.bias.to(dtype)


def _stats_momentum(norm: nn.modules.batchnorm._BatchNorm) -> float:
    """The running statistics' update factor, counting the batch; 0 in evaluation and in a
    recomputation (the statistics stay as they are)."""
    if not norm.training or norm.recomputing:
        return 0.0
    norm.num_batches_tracked.add_(1)
    return 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum


def build_backbone(cfg: PixelBertConfig) -> ResNet:
    """A torchvision ResNet without avgpool/fc; its parameter names match torchvision
    weight files, so `load_state_dict` of an ImageNet checkpoint works directly."""
    block, layers, groups, width = BACKBONES[cfg.backbone]
    norm = FrozenBN if cfg.freeze_bn else BatchNorm
    net = ResNet(
        BasicBlock if block == "basic" else Bottleneck, layers, groups=groups, width_per_group=width, norm_layer=norm
    )
    del net.avgpool, net.fc
    return net


def _stem(net: ResNet, x: torch.Tensor) -> torch.Tensor:
    return net.maxpool(net.relu(net.bn1(net.conv1(x))))


@contextlib.contextmanager
def _recomputing(module: nn.Module):
    norms = [m for m in module.modules() if isinstance(m, (BatchNorm, SyncBatchNorm))]
    before = [norm.recomputing for norm in norms]  # nested checkpoints: restore, not clear
    for norm in norms:
        norm.recomputing = True
    try:
        yield
    finally:
        for norm, flag in zip(norms, before):
            norm.recomputing = flag


def _checkpointed(run, owner: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``run(x)`` keeping only ``x`` for backward (non-reentrant torch checkpointing, RNG
    state replayed, the BatchNorms of ``owner`` not updated again when recomputed)."""
    return checkpoint(run, x, use_reentrant=False, context_fn=partial(_checkpoint_contexts, owner))


def _blocks_checkpointed(stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    for block in stage:
        x = _checkpointed(block, block, x)
    return x


def _checkpoint_contexts(owner: nn.Module):
    """(context of the first forward, context of the recomputation in backward)."""
    return contextlib.nullcontext(), _recomputing(owner)


def trunk_forward(net: ResNet, images: torch.Tensor, checkpointing: bool = False) -> torch.Tensor:
    """The trunk's stem and four stages. With ``checkpointing`` the forward keeps only the
    input of the stem and of each stage for backward; the backward recomputes a stage with
    each of its residual blocks checkpointed again (nested), so it holds that stage's block
    inputs and one block's activations at a time, never a whole stage's (layer1 at full
    resolution would otherwise be most of the peak). The price: the CNN's forward runs
    three times per step instead of once."""
    stages = (net.layer1, net.layer2, net.layer3, net.layer4)
    if not checkpointing:
        return net.layer4(net.layer3(net.layer2(net.layer1(_stem(net, images)))))
    x = _checkpointed(partial(_stem, net), net.bn1, images)
    for stage in stages:
        x = _checkpointed(partial(_blocks_checkpointed, stage), stage, x)
    return x


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
        self.checkpointing = cfg.activation_checkpointing == "all"
        self.backbone = build_backbone(cfg)
        self.proj = nn.Linear(cfg.backbone_channels, cfg.hidden_size)
        # LayerNorm brings the projected CNN features to the scale of the LN-ed text
        # embeddings; s_v is the paper's one semantic vector shared by every pixel.
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.semantic = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def cnn(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] feature grid of a batch of images (64-multiple sizes)."""
        if self.cfg.channels_last:
            # Only the input: a channels_last input makes cuDNN pick NHWC kernels, while
            # the weights stay contiguous (DeepSpeed views every parameter as flat bytes).
            images = images.contiguous(memory_format=torch.channels_last)
        checkpointing = self.checkpointing and self.training and torch.is_grad_enabled()
        feats = trunk_forward(self.backbone, images, checkpointing)
        if self.cfg.extra_pool:
            feats = F.max_pool2d(feats, kernel_size=2, stride=2, ceil_mode=True)
        return feats

    def cnn_per_size(self, images: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """The feature grid with each image run at its own 64-multiple size, so its
        features do not depend on how far a bigger neighbour padded it (the CNN's
        receptive field reaches into the padding). For evaluation: one CNN call per
        distinct size (one in all with bucketing), and BatchNorm uses running statistics,
        so grouping changes nothing else."""
        full = tuple(images.shape[-2:])
        groups: dict[tuple[int, int], list[int]] = {}
        for row, size in enumerate(image_sizes.tolist()):  # a host sync: evaluation only
            own = tuple(min(-(-max(d, 1) // DOWNSAMPLE) * DOWNSAMPLE, limit) for d, limit in zip(size, full))
            groups.setdefault(own, []).append(row)
        if list(groups) == [full]:
            return self.cnn(images)
        stride = self.feature_stride()
        out = None
        for (h, w), rows in groups.items():
            feats = self.cnn(images[rows, :, :h, :w])
            if out is None:
                out = feats.new_zeros(len(images), feats.shape[1], *(-(-d // stride) for d in full))
            out[rows, :, : feats.shape[-2], : feats.shape[-1]] = feats
        return out

    def feature_stride(self) -> int:
        return DOWNSAMPLE if self.cfg.extra_pool else DOWNSAMPLE // 2

    def forward(self, images: torch.Tensor, image_sizes: torch.Tensor | None, sample: int = 0):
        if image_sizes is not None and not self.training:
            feats = self.cnn_per_size(images, image_sizes)
        else:
            feats = self.cnn(images)
        grid = feats.shape[-2:]
        feats = feats.flatten(2).transpose(1, 2)  # [B, h*w, C]
        if image_sizes is None:
            mask = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
        else:
            mask = feature_mask(image_sizes, grid, self.feature_stride())
        if sample:
            # Sample before projecting: the projection then runs on k pixels, not all.
            index, mask = sample_pixels(mask, sample)
            feats = feats.gather(1, index[..., None].expand(-1, -1, feats.shape[-1]))
        tokens = self.LayerNorm(self.proj(feats)) + self.semantic
        return self.dropout(tokens), mask
