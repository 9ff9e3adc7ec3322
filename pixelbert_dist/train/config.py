"""RunConfig: the whole pre-training run, composed from each module's own config; and
LoopConfig, the training loop's section that fine-tuning's config extends too.

Each field carries its help and bounds (``pixelbert_dist.config``: ``Help``, ``Ge``...):
``--help`` lists them, and a value out of bounds is refused at config time, by key."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from annotated_types import Ge, Gt, Interval

from pixelbert_dist.config import ConfigError, Help, check_fields, entries_of
from pixelbert_dist.data.config import DataConfig
from pixelbert_dist.model.config import PixelBertConfig
from pixelbert_dist.tracking import check_report_to

Precision = Literal["fp32", "bf16", "fp16"]
Beta = Annotated[float, Interval(ge=0, lt=1)]


@dataclass
class OptimConfig:
    """One optimiser, two rules (pixelbert_dist.train.optim): SGD for the CNN, AdamW for the rest."""

    cnn_rule: Annotated[
        Literal["sgd", "adamw"], Help("the CNN's rule: sgd (the paper's, for an ImageNet CNN) or adamw (from scratch)")
    ] = "sgd"
    cnn_lr: Annotated[float, Help("the CNN's learning rate"), Gt(0)] = 1e-2
    cnn_momentum: Annotated[float, Help("the CNN's SGD momentum"), Interval(ge=0, lt=1)] = 0.9
    cnn_weight_decay: Annotated[float, Help("the CNN's weight decay"), Ge(0)] = 5e-4
    lr: Annotated[float, Help("the transformer's learning rate (AdamW)"), Gt(0)] = 1e-4
    weight_decay: Annotated[float, Help("the transformer's AdamW weight decay"), Ge(0)] = 1e-2
    betas: Annotated[tuple[Beta, Beta], Help("AdamW's (beta1, beta2), each in [0, 1)")] = (0.9, 0.999)
    eps: Annotated[float, Help("AdamW's epsilon"), Gt(0)] = 1e-8
    fused: Annotated[bool | None, Help("the fused AdamW kernel; null: where the parameters are on CUDA")] = None


@dataclass
class ScheduleConfig:
    """Linear warm-up, then step decay (the paper) or cosine (pixelbert_dist.train.schedule)."""

    warmup_steps: Annotated[int, Help("optimiser steps of linear warm-up from 0"), Ge(0)] = 0
    kind: Annotated[Literal["step", "cosine", "constant"], Help("the decay after warm-up")] = "step"
    milestones_epochs: Annotated[
        list[Annotated[float, Ge(0)]], Help("kind=step: lr x schedule.gamma at each of these epochs")
    ] = field(default_factory=lambda: [25, 35])
    gamma: Annotated[float, Help("kind=step: the factor at each milestone"), Interval(gt=0, le=1)] = 0.1
    min_lr_ratio: Annotated[
        float, Help("kind=cosine: the end value as a fraction of the base lr"), Interval(ge=0, le=1)
    ] = 0.0


@dataclass
class ModelSection:
    preset: Annotated[str, Help("a registered model preset (--list-presets)")] = "tiny"
    overrides: Annotated[
        dict[str, Any],
        Help("PixelBertConfig fields set over the preset's (model.overrides.num_layers=6); model/config.py"),
        entries_of(PixelBertConfig),
    ] = field(default_factory=dict)
    bert_dir: Annotated[str | None, Help("local Hugging Face BERT checkpoint directory")] = None
    cnn_weights: Annotated[str | None, Help("local torchvision weights file for the CNN trunk")] = None
    visual_weights: Annotated[
        str | None,
        Help("a file of visual.* tensors (CNN + projection), e.g. the demo's warm start (train/visual_warmstart.py)"),
    ] = None
    freeze: Annotated[list[str], Help("parameter-name prefixes to keep fixed (e.g. [visual.backbone])")] = field(
        default_factory=list
    )


@dataclass
class LoopConfig:
    """The training loop's settings, shared by pre-training and fine-tuning (``train.*``).

    The one source of truth for batch size, accumulation and clipping: DeepSpeed's
    "auto" fields are filled from here, and a contradicting JSON value is refused."""

    micro_batch: Annotated[int, Help("examples per GPU and micro-batch"), Ge(1)] = 8
    grad_accum: Annotated[int, Help("micro-batches per optimiser step"), Ge(1)] = 1
    global_batch: Annotated[
        int,
        Help(
            "pairs per optimiser step over all ranks (the paper: 4096); > 0: grad_accum follows "
            "from it for the world size the run gets, so a resume on other nodes keeps the recipe"
        ),
        Ge(0),
    ] = 0
    grad_clip: Annotated[float, Help("gradient-norm clipping (DeepSpeed's gradient_clipping); 0: off"), Ge(0)] = 1.0
    precision: Annotated[Precision | None, Help("null: the DeepSpeed JSON decides")] = None
    epochs: Annotated[float, Help("passes over the training split (fractions allowed)"), Ge(0)] = 40.0
    max_steps: Annotated[int, Help("> 0: stop after this many optimiser steps"), Ge(0)] = 0
    log_every: Annotated[int, Help("optimiser steps between train log lines"), Ge(1)] = 10
    eval_every: Annotated[int, Help("optimiser steps between evaluations; 0: after every epoch"), Ge(0)] = 0
    save_every: Annotated[int, Help("optimiser steps between checkpoints; 0: at the end only"), Ge(0)] = 500
    save_every_minutes: Annotated[
        float, Help("also save when this many minutes passed since the last save (rank 0's clock); 0: off"), Ge(0)
    ] = 30.0
    async_save: Annotated[
        bool, Help("write checkpoints in a background thread: the step waits for the host copy only")
    ] = True
    checkpoint_mirror: Annotated[
        str | None,
        Help("fsspec URL (s3://bucket/run/) each finished checkpoint is copied to; resumed from when local is empty"),
    ] = None
    keep_last: Annotated[int, Help("checkpoints kept on disk; 0: all"), Ge(0)] = 3
    resume: Annotated[str, Help('"auto" (the latest checkpoint), "none", a tag or a checkpoint path')] = "auto"
    resume_universal: Annotated[bool, Help("allow a resume at another world size (universal checkpoint)")] = False
    seed: Annotated[int, Help("initial weights, dropout and pixel sampling"), Ge(0)] = 0
    compile: Annotated[bool, Help("torch.compile through DeepSpeed's engine.compile()")] = False
    activation_checkpointing: Annotated[
        Literal["none", "transformer", "all"] | None,
        Help(
            "recompute activations in backward: transformer (encoder layers) or all (also the CNN); "
            "null: as the model preset / model.overrides say"
        ),
    ] = None
    sync_bn: Annotated[bool, Help("SyncBatchNorm across ranks (CUDA only)")] = False
    max_nonfinite_in_row: Annotated[
        int, Help("NaN/inf losses are skipped and counted; this many in a row stop the run"), Ge(1)
    ] = 20
    max_loss: Annotated[
        float, Help("a finite loss above this is a blow-up: skipped and counted like NaN/inf"), Gt(0)
    ] = 1e4
    hang_timeout_s: Annotated[
        float,
        Help("a rank whose optimizer steps stop for this long dumps its stacks and exits (code 86); 0: off"),
        Ge(0),
    ] = 600.0
    collective_timeout_s: Annotated[float, Help("the bound on one collective, once training runs"), Gt(0)] = 300.0
    slow_phase_timeout_s: Annotated[
        float,
        Help("the watchdog's and the collectives' bound from start-up to the first step, around saves and evaluations"),
        Gt(0),
    ] = 1800.0
    report_to: Annotated[
        list[Literal["tensorboard", "wandb"]],
        Help(
            "where metrics go besides metrics.jsonl: [tensorboard], [wandb], both, or [] (rank 0 only; "
            "wandb needs the wandb extra)"
        ),
    ] = field(default_factory=lambda: ["tensorboard"])
    wandb_project: Annotated[str, Help("W&B's project; entity and mode from WANDB_* variables")] = "pixelbert_dist"
    profile_steps: Annotated[
        str | int,
        Help(
            'e.g. "10-15": a torch.profiler trace of those optimiser steps in RUN/profile (TensorBoard-'
            'readable; on CUDA a memory snapshot too); "": off'
        ),
    ] = ""

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per optimiser step at this world size: ``grad_accum``, or what
        ``global_batch`` asks (one line naming both keys when it cannot be met)."""
        if not self.global_batch:
            return self.grad_accum
        per_pass = self.micro_batch * world_size
        steps, left = divmod(self.global_batch, per_pass)
        if left or not steps:
            fits = [m for m in range(self.micro_batch, 0, -1) if self.global_batch % (m * world_size) == 0]
            hint = f"train.micro_batch={fits[0]} fits" if fits else "no micro-batch size fits this world size"
            raise ConfigError(
                f"train.global_batch={self.global_batch} is not a multiple of train.micro_batch x ranks = "
                f"{self.micro_batch} x {world_size} = {per_pass} ({hint})"
            )
        if self.grad_accum not in (1, steps):
            raise ConfigError(
                f"train.global_batch={self.global_batch} gives grad_accum {steps} on {world_size} ranks, "
                f"but train.grad_accum={self.grad_accum}: set one of the two"
            )
        return steps

    def check_fits(self, samples: int | None, world: int) -> None:
        """Refuse a micro-batch larger than one rank's share of the epoch: every batch would
        be short, and the batch per step would not be the micro x accumulation x ranks that
        the banner, the lr and DeepSpeed's train_batch_size assume. Refused, not clamped:
        DeepSpeed and torchtitan take the batch size as given, and a batch quietly changed
        changes what the lr means and what a resume expects."""
        share = None if samples is None else -(-samples // world)
        if share is not None and share < self.micro_batch:
            raise ConfigError(
                f"train.micro_batch={self.micro_batch}: the training split has {samples} samples, {share} per rank "
                f"on {world} rank(s), fewer than one micro-batch (a step of {self.micro_batch} x {self.grad_accum} x "
                f"{world} = {self.micro_batch * self.grad_accum * world} would never be full); "
                f"set train.micro_batch <= {share}"
            )

    def validate(self) -> "LoopConfig":
        """Types and bounds (also for a config made in Python), then what spans two keys."""
        check_fields(self, "train.")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ConfigError("set train.epochs > 0 or train.max_steps > 0")
        check_report_to(self.report_to)
        self.profile_range()
        return self

    def profile_range(self) -> tuple[int, int] | None:
        """``profile_steps`` as (first, last) optimiser steps, both included; None when off."""
        text = str(self.profile_steps).strip()
        if not text:
            return None
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", text)
        first, last = (int(match.group(1)), int(match.group(2) or match.group(1))) if match else (0, 0)
        if not match or not 1 <= first <= last:
            raise ConfigError(
                f"train.profile_steps={self.profile_steps!r}: expected FIRST-LAST optimiser steps "
                "(1 <= FIRST <= LAST, e.g. 10-15), one step (12), or empty for no profiling"
            )
        return first, last


@dataclass
class TrainConfig(LoopConfig):
    """Pre-training's loop settings."""

    eval_batches: Annotated[int, Help("validation batches per evaluation; 0: the whole split"), Ge(0)] = 0
    retrieval_size: Annotated[int, Help("held-out images for the R@1 probe; 0: off"), Ge(0)] = 32
    export: Annotated[bool, Help("write the fine-tuning export at the end")] = True


@dataclass
class RunConfig:
    run_dir: Annotated[str, Help("the run's folder: config, checkpoints, logs, export")] = "runs/default"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "RunConfig":
        check_fields(self)
        self.train.validate()
        if not self.data.train_shards:
            raise ConfigError(
                "data.train_shards is empty: point it at a shard split directory "
                "(python launch/make_shards.py synthetic --out DIR makes one)"
            )
        self.data.validate()
        return self
