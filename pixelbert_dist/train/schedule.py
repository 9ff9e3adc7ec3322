"""Learning-rate schedules: linear warm-up, then step decay (the paper) or cosine.

One multiplicative factor, a function of the optimiser step, is applied to every
param group's own base lr, so the CNN (SGD, 1e-2) and the transformer (AdamW, 1e-4)
keep their ratio throughout. It is a plain ``LambdaLR``: its state_dict (last step,
base lrs) goes into DeepSpeed checkpoints as is, and the factor is recomputed from
the step, so a resumed run continues on the same curve.
"""
from __future__ import annotations

import math

import torch

from pixelbert_dist.train.config import ScheduleConfig  # noqa: F401  (its home is the config module)

KINDS = ("step", "cosine", "constant")


class LrFactor:
    """step -> factor (the step counts optimiser steps from 0)."""

    def __init__(self, cfg: ScheduleConfig, steps_per_epoch: int, total_steps: int):
        _validate(cfg, steps_per_epoch, total_steps)
        self.cfg = cfg
        self.total_steps = total_steps
        # the milestone steps: an epoch boundary, never fractional
        self.milestones = sorted(round(e * steps_per_epoch) for e in cfg.milestones_epochs)

    def __call__(self, step: int) -> float:
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps  # never exactly 0: step 0 already learns
        if cfg.kind == "constant":
            return 1.0
        if cfg.kind == "step":
            return cfg.gamma ** sum(step >= m for m in self.milestones)
        span = max(1, self.total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine


def _validate(cfg: ScheduleConfig, steps_per_epoch: int, total_steps: int) -> None:
    if cfg.kind not in KINDS:
        raise ValueError(f"schedule.kind must be one of {KINDS}, got {cfg.kind!r}")
    if steps_per_epoch < 1 or total_steps < 1:
        raise ValueError(f"steps_per_epoch ({steps_per_epoch}) and total_steps ({total_steps}) "
                         f"must be >= 1")
    if cfg.warmup_steps < 0:
        raise ValueError(f"schedule.warmup_steps must be >= 0, got {cfg.warmup_steps}")
    if cfg.warmup_steps >= total_steps and cfg.kind == "cosine":
        raise ValueError(f"schedule.warmup_steps ({cfg.warmup_steps}) must be below the total "
                         f"steps ({total_steps}) for a cosine schedule")
    if not 0.0 < cfg.gamma <= 1.0:
        raise ValueError(f"schedule.gamma must lie in (0, 1], got {cfg.gamma}")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ValueError(f"schedule.min_lr_ratio must lie in [0, 1], got {cfg.min_lr_ratio}")
    if any(e < 0 for e in cfg.milestones_epochs):
        raise ValueError(f"schedule.milestones_epochs must be >= 0, got {cfg.milestones_epochs}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, steps_per_epoch: int,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per optimiser step (DeepSpeed steps it inside ``engine.step``)."""
    factor = LrFactor(cfg, steps_per_epoch, total_steps)

    def lr_lambda(step: int) -> float:
        # a plain function: LambdaLR saves the __dict__ of callable objects into its
        # state_dict (and restores it on load, overriding a changed config); a function
        # is saved as None, so checkpoints hold only numbers
        return factor(step)

    # one lambda per group: the same factor, each group scaled from its own base lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [lr_lambda] * len(optimizer.param_groups))
