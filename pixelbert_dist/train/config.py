"""RunConfig: the whole pre-training run, composed from each module's own config; and
LoopConfig, the training loop's section that fine-tuning's config extends too."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pixelbert_dist.data.config import DataConfig

Precision = Literal["fp32", "bf16", "fp16"]


@dataclass
class OptimConfig:
    """One optimiser, two rules (pixelbert_dist.train.optim): SGD for the CNN, AdamW for the rest."""

    cnn_rule: Literal["sgd", "adamw"] = "sgd"  # sgd: the paper's, for an ImageNet CNN; adamw: one from scratch
    cnn_lr: float = 1e-2
    cnn_momentum: float = 0.9
    cnn_weight_decay: float = 5e-4
    lr: float = 1e-4  # the transformer's (AdamW)
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    fused: bool | None = None  # None: the fused AdamW kernel where the params are on CUDA


@dataclass
class ScheduleConfig:
    """Linear warm-up, then step decay (the paper) or cosine (pixelbert_dist.train.schedule)."""

    warmup_steps: int = 0
    kind: Literal["step", "cosine", "constant"] = "step"
    milestones_epochs: list[float] = field(default_factory=lambda: [25, 35])  # step: lr x gamma at these epochs
    gamma: float = 0.1
    min_lr_ratio: float = 0.0  # cosine: the end value as a fraction of the base lr


@dataclass
class ModelSection:
    preset: str = "tiny"
    overrides: dict = field(default_factory=dict)  # any PixelBertConfig field
    bert_dir: str | None = None  # local Hugging Face BERT checkpoint directory
    cnn_weights: str | None = None  # local torchvision weights file for the CNN trunk
    visual_weights: str | None = None  # a file of visual.* tensors (CNN + projection), e.g. the
    # demo's warm start (pixelbert_dist.train.visual_warmstart)
    freeze: list[str] = field(default_factory=list)  # parameter-name prefixes to keep fixed


@dataclass
class LoopConfig:
    """The training loop's settings, shared by pre-training and fine-tuning (``train.*``).

    The one source of truth for batch size, accumulation and clipping: DeepSpeed's
    "auto" fields are filled from here, and a contradicting JSON value is refused."""

    micro_batch: int = 8  # examples per GPU and micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    grad_clip: float = 1.0  # gradient-norm clipping (DeepSpeed's gradient_clipping)
    precision: Precision | None = None  # None: the DeepSpeed JSON decides (bf16/fp16/fp32)
    epochs: float = 40.0
    max_steps: int = 0  # > 0: stop after this many optimiser steps
    log_every: int = 10  # optimiser steps between train log lines
    eval_every: int = 0  # optimiser steps; 0: at the end of every epoch
    save_every: int = 500  # optimiser steps between checkpoints; 0: at the end only
    keep_last: int = 3  # checkpoints kept
    resume: str = "auto"  # "auto" (latest), "none", a tag or a checkpoint path
    resume_universal: bool = False  # allow a resume at another world size (universal ckpt)
    seed: int = 0
    compile: bool = False  # torch.compile through DeepSpeed's engine.compile()
    # recompute instead of keeping activations: none, transformer (encoder layers) or all (also
    # the CNN stem and stages); None: as the model preset / model.overrides say
    activation_checkpointing: Literal["none", "transformer", "all"] | None = None
    sync_bn: bool = False  # SyncBatchNorm across ranks (CUDA only)
    max_nonfinite_in_row: int = 20  # NaN/inf losses are skipped and counted; this many in a row stop the run
    max_loss: float = 1e4  # a finite loss above this is a blow-up: skipped and counted like NaN/inf
    # a rank whose optimizer steps stop for this long dumps its stacks and exits (code 86); 0: off
    hang_timeout_s: float = 600.0
    collective_timeout_s: float = 300.0  # one collective, once training runs
    # start-up to the first step, a save, an evaluation: the watchdog's and the collectives' bound
    slow_phase_timeout_s: float = 1800.0

    def validate(self) -> "LoopConfig":
        if self.micro_batch < 1 or self.grad_accum < 1:
            raise ValueError(
                f"train.micro_batch={self.micro_batch} and train.grad_accum={self.grad_accum} must be >= 1"
            )
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ValueError("set train.epochs > 0 or train.max_steps > 0")
        if self.max_nonfinite_in_row < 1:
            raise ValueError(f"train.max_nonfinite_in_row={self.max_nonfinite_in_row} must be >= 1")
        if not self.max_loss > 0:
            raise ValueError(f"train.max_loss={self.max_loss} must be > 0")
        if self.hang_timeout_s < 0 or self.collective_timeout_s <= 0 or self.slow_phase_timeout_s <= 0:
            raise ValueError(
                f"train.hang_timeout_s={self.hang_timeout_s} must be >= 0 (0: off), train.collective_timeout_s="
                f"{self.collective_timeout_s} and train.slow_phase_timeout_s={self.slow_phase_timeout_s} > 0"
            )
        if self.log_every < 1:
            raise ValueError(f"train.log_every={self.log_every} must be >= 1")
        return self


@dataclass
class TrainConfig(LoopConfig):
    """Pre-training's loop settings."""

    eval_batches: int = 0  # 0: the whole validation split
    retrieval_size: int = 32  # held-out images for the R@1 probe (0: off)
    export: bool = True  # write the fine-tuning export at the end


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "RunConfig":
        self.train.validate()
        if not self.data.train_shards:
            raise ValueError(
                "data.train_shards is empty: point it at a shard split directory "
                "(python launch/make_shards.py synthetic --out DIR makes one)"
            )
        self.data.validate()
        return self
