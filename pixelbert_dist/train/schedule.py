"""Learning-rate schedules: linear warm-up, then step decay (the paper) or cosine.

One multiplicative factor, a function of the optimiser step, is applied to every
param group's own base lr, so the CNN (SGD, 1e-2) and the transformer (AdamW, 1e-4)
keep their ratio throughout. It is a plain ``LambdaLR``: its state_dict (last step,
base lrs) goes into DeepSpeed checkpoints as is, and the factor is recomputed from
the step, so a resumed run continues on the same curve.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import torch

from pixelbert_dist.train.config import ScheduleConfig

log = logging.getLogger(__name__)
KINDS = ("step", "cosine", "constant")


def clamp_warmup(cfg: ScheduleConfig, total_steps: int) -> tuple[ScheduleConfig, str | None]:
    """Warm-up longer than the run is cut to the run (as HF's Trainer lets a short run
    through); the config to use, and the one warning to give (None when nothing changed)."""
    if cfg.warmup_steps <= total_steps:
        return cfg, None
    note = (
        f"schedule.warmup_steps={cfg.warmup_steps} is longer than the run ({total_steps} steps): "
        f"warm-up clamped to {total_steps} steps (the lr reaches its peak at the last step)"
    )
    return replace(cfg, warmup_steps=total_steps), note


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
        raise ValueError(f"steps_per_epoch ({steps_per_epoch}) and total_steps ({total_steps}) must be >= 1")
    if cfg.warmup_steps < 0:
        raise ValueError(f"schedule.warmup_steps must be >= 0, got {cfg.warmup_steps}")
    if not 0.0 < cfg.gamma <= 1.0:
        raise ValueError(f"schedule.gamma must lie in (0, 1], got {cfg.gamma}")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ValueError(f"schedule.min_lr_ratio must lie in [0, 1], got {cfg.min_lr_ratio}")
    if any(e < 0 for e in cfg.milestones_epochs):
        raise ValueError(f"schedule.milestones_epochs must be >= 0, got {cfg.milestones_epochs}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, steps_per_epoch: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per optimiser step (DeepSpeed steps it inside ``engine.step``).
    Warm-up longer than the run is clamped (``clamp_warmup``; the caller gives the warning)."""
    factor = LrFactor(clamp_warmup(cfg, total_steps)[0], steps_per_epoch, total_steps)

    def lr_lambda(step: int) -> float:
        # a plain function: LambdaLR saves the __dict__ of callable objects into its
        # state_dict (and restores it on load, overriding a changed config); a function
        # is saved as None, so checkpoints hold only numbers
        return factor(step)

    # one lambda per group: the same factor, each group scaled from its own base lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [lr_lambda] * len(optimizer.param_groups))


# ---- a resume with changed rates -----------------------------------------------------
_NOT_SETTINGS = ("params", "lr", "initial_lr")


def group_settings(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each param group's hyper-parameters as the config set them; ``base_lr`` is the
    rate before any schedule factor (LambdaLR's ``initial_lr``). Take it before a resume."""
    return [
        {"base_lr": g.get("initial_lr", g["lr"]), **{k: v for k, v in g.items() if k not in _NOT_SETTINGS}}
        for g in optimizer.param_groups
    ]


def apply_settings(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, settings: list[dict]
) -> list[str]:
    """After loading a checkpoint (which restores the saved groups and base rates): put
    the config's hyper-parameters back, the rates as new base rates times the schedule's
    factor at the resumed step. Returns what changed, for the log."""
    changed = []
    for i, (group, want) in enumerate(zip(optimizer.param_groups, settings)):
        name = group.get("name", f"group {i}")
        if not math.isclose(scheduler.base_lrs[i], want["base_lr"], rel_tol=1e-12):
            changed.append(f"{name} lr {scheduler.base_lrs[i]:g} -> {want['base_lr']:g}")
            scheduler.base_lrs[i] = group["initial_lr"] = want["base_lr"]
            group["lr"] = want["base_lr"] * scheduler.lr_lambdas[i](scheduler.last_epoch)
        for key, value in want.items():
            if key != "base_lr" and key in group and group[key] != value:
                changed.append(f"{name} {key} {group[key]} -> {value}")
                group[key] = value
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    return changed
