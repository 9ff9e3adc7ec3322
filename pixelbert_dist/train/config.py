"""RunConfig: the whole pre-training run, composed from each module's own config."""
from __future__ import annotations

from dataclasses import dataclass, field

from pixelbert_dist.data.config import DataConfig
from pixelbert_dist.train.optim import OptimConfig
from pixelbert_dist.train.schedule import ScheduleConfig


@dataclass
class ModelSection:
    preset: str = "tiny"
    overrides: dict = field(default_factory=dict)  # any PixelBertConfig field
    bert_dir: str | None = None      # local Hugging Face BERT checkpoint directory
    cnn_weights: str | None = None   # local torchvision weights file for the CNN trunk
    visual_weights: str | None = None  # a file of visual.* tensors (CNN + projection), e.g. the
                                       # demo's warm start (pixelbert_dist.train.visual_warmstart)
    freeze: list = field(default_factory=list)  # parameter-name prefixes to keep fixed


@dataclass
class TrainConfig:
    # The one source of truth for batch size, accumulation and clipping: DeepSpeed's
    # "auto" fields are filled from here, and a contradicting JSON value is refused.
    micro_batch: int = 8            # per GPU
    grad_accum: int = 1
    grad_clip: float = 1.0
    precision: str | None = None    # None: the DeepSpeed JSON decides (bf16/fp16/fp32)
    epochs: float = 40.0
    max_steps: int = 0              # > 0: stop after this many optimiser steps
    log_every: int = 10
    eval_every: int = 0             # optimiser steps; 0: at the end of every epoch
    eval_batches: int = 0           # 0: the whole validation split
    retrieval_size: int = 32        # held-out images for the R@1 probe (0: off)
    save_every: int = 500
    keep_last: int = 3
    resume: str = "auto"            # "auto" (latest), "none", a tag or a checkpoint path
    resume_universal: bool = False  # allow a resume at another world size (universal ckpt)
    seed: int = 0
    compile: bool = False           # torch.compile through DeepSpeed's engine.compile()
    sync_bn: bool = False           # SyncBatchNorm across ranks (CUDA only)
    export: bool = True             # write the fine-tuning export at the end
    max_nonfinite_in_row: int = 20  # NaN/inf losses are skipped and counted; this many in a row stop the run


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "RunConfig":
        t = self.train
        if t.micro_batch < 1 or t.grad_accum < 1:
            raise ValueError(f"train.micro_batch={t.micro_batch} and train.grad_accum={t.grad_accum} must be >= 1")
        if t.epochs <= 0 and t.max_steps <= 0:
            raise ValueError("set train.epochs > 0 or train.max_steps > 0")
        if t.max_nonfinite_in_row < 1:
            raise ValueError(f"train.max_nonfinite_in_row={t.max_nonfinite_in_row} must be >= 1")
        if t.precision not in (None, "fp32", "bf16", "fp16"):
            raise ValueError(f"train.precision={t.precision!r}: use fp32, bf16, fp16 or leave it unset")
        if not self.data.train_shards:
            raise ValueError("data.train_shards is empty: point it at a shard split directory "
                             "(python launch/make_shards.py synthetic --out DIR makes one)")
        self.data.validate()
        return self
