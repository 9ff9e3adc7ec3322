"""A stand-in for the paper's ImageNet initialisation on the synthetic set: train the CNN
trunk as a multi-label classifier of the synthetic scenes' colours and shapes, and save
it as a torchvision weights file, which pre-training then loads through
``model.cnn_weights`` exactly like a user's ImageNet checkpoint.

A CNN from random initialisation gives pixel features that barely differ between images;
MLM is solved from the text alone and ITM never leaves chance in a CPU-sized run. The
paper starts from ImageNet weights; this gives the demo the same kind of start."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from pixelbert_dist.data.builders.synthetic import COLORS, SHAPES
from pixelbert_dist.data.config import DataConfig
from pixelbert_dist.data.loader import build_loader
from pixelbert_dist.model.config import BACKBONES

log = logging.getLogger(__name__)
LABELS = list(COLORS) + list(SHAPES)


def scene_targets(metas: list[dict]) -> torch.Tensor:
    """[B, colours + shapes] multi-hot: which colours and shapes a scene contains."""
    out = torch.zeros(len(metas), len(LABELS))
    for row, meta in enumerate(metas):
        for obj in meta["objects"]:
            out[row, LABELS.index(obj["color"])] = 1
            out[row, LABELS.index(obj["shape"])] = 1
    return out


def warmstart_cnn(data: DataConfig, shards: str, backbone: str, out_path: str | Path, steps: int = 120,
                  batch_size: int = 32, lr: float = 2e-3, seed: int = 0) -> dict:
    """Train ``backbone`` (a torchvision ResNet with a fresh fc) on the scene labels; returns
    the final-window multi-label accuracy and writes the weights to ``out_path``."""
    torch.manual_seed(seed)
    block, layers, groups, width = BACKBONES[backbone]
    net = ResNet(BasicBlock if block == "basic" else Bottleneck, layers, groups=groups,
                 width_per_group=width, num_classes=len(LABELS))
    loader = build_loader(dataclasses.replace(data, hflip=False), shards, batch_size, train=True)
    optim = torch.optim.AdamW(net.parameters(), lr=lr)
    position = {ref.key: i for i, ref in enumerate(loader.index.samples)}
    step, correct = 0, []
    while step < steps:
        loader.set_epoch(step // max(len(loader), 1))
        for batch in loader:
            targets = scene_targets([loader.index.meta(position[k]) for k in batch["keys"]])
            logits = net(batch["images"])
            loss = F.binary_cross_entropy_with_logits(logits, targets)
            loss.backward()
            optim.step()
            optim.zero_grad()
            correct.append(((logits > 0) == targets.bool()).float().mean().item())
            step += 1
            if step % 20 == 0:
                log.info("cnn warm-start step %d: loss %.3f, label accuracy %.3f", step, loss.item(),
                         sum(correct[-20:]) / 20)
            if step >= steps:
                break
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), out_path)
    return {"steps": step, "label_accuracy": sum(correct[-20:]) / len(correct[-20:])}
