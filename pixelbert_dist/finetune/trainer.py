"""FinetuneTrainer: a task head on a pre-training export, trained on the one training
loop (``train.loop.BaseTrainer``: DeepSpeed engine + ZeRO, the hybrid SGD/AdamW optimiser,
the lr schedule, NaN/inf skipping, checkpoints with exact resume, GracefulExit,
TensorBoard/JSONL logging, the throughput meter), ending in a results file: the official
metrics of every evaluation split, the prediction files and what was skipped and why."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pixelbert_dist.checkpoint.engine_io import config_fingerprint
from pixelbert_dist.checkpoint.files import CheckpointError
from pixelbert_dist.collectives import collective_device
from pixelbert_dist.config import to_dict
from pixelbert_dist.data.text import load_tokenizer
from pixelbert_dist.finetune.config import FinetuneConfig
from pixelbert_dist.finetune.data import KeyedImages, TaskLoader, loader_data_config
from pixelbert_dist.finetune.tasks import make_task
from pixelbert_dist.model import PixelBert, preset_config
from pixelbert_dist.model.flops import training_flops_analytic
from pixelbert_dist.model.pretrained import read_pretrained_config
from pixelbert_dist.train.loop import BaseTrainer
from pixelbert_dist.train.optim import HybridOptimizer, param_groups

ARCH_FIELDS = (
    "backbone",
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "intermediate_size",
    "max_position_embeddings",
)


def load_export(cfg: FinetuneConfig):
    """The exported PixelBert (pixel sampling off) and its tokenizer, checked against
    ``cfg.preset`` and ``cfg.data.vocab_dir``: a mismatch stops with the reason."""
    folder = Path(cfg.pretrained)
    arch = read_pretrained_config(folder)
    if cfg.preset:
        want = preset_config(cfg.preset)
        diff = {f: (getattr(arch, f), getattr(want, f)) for f in ARCH_FIELDS if getattr(arch, f) != getattr(want, f)}
        if diff:
            raise ValueError(f"{folder} is not a {cfg.preset!r} export (field: (export, preset)): {diff}")
    vocab_dir = Path(cfg.data.vocab_dir) if cfg.data.vocab_dir else folder
    if not (vocab_dir / "vocab.txt").is_file():
        raise FileNotFoundError(f"{vocab_dir} has no vocab.txt: the export has no tokenizer; set data.vocab_dir")
    if (
        cfg.data.vocab_dir
        and (folder / "vocab.txt").is_file()
        and (folder / "vocab.txt").read_text() != (vocab_dir / "vocab.txt").read_text()
    ):
        raise ValueError(
            f"tokenizer mismatch: {vocab_dir / 'vocab.txt'} differs from the vocabulary the "
            f"export {folder} was pre-trained with ({folder / 'vocab.txt'})"
        )
    tokenizer = load_tokenizer(vocab_dir)
    if len(tokenizer) > arch.vocab_size:
        raise ValueError(
            f"tokenizer {vocab_dir} has {len(tokenizer)} tokens, the export {folder} only "
            f"{arch.vocab_size} embeddings: wrong vocabulary for this export"
        )
    model = PixelBert.from_pretrained(folder, allow_unverified=cfg.allow_unverified_weights, pixel_sample_size=0)
    return model, tokenizer


def build_optimizer(model: torch.nn.Module, cfg: FinetuneConfig) -> HybridOptimizer:
    """The pre-training groups (SGD for the CNN, AdamW for the rest) plus the new head's
    own AdamW groups at ``head_lr_mult`` x lr: it starts from random weights."""
    head = {id(p) for p in getattr(model, "head", torch.nn.Identity()).parameters()}
    groups = []
    for group in param_groups(model, cfg.optim, lambda n: n.startswith("backbone.visual.backbone.")):
        mine = [p for p in group["params"] if id(p) in head]
        rest = [p for p in group["params"] if id(p) not in head]
        if rest:
            groups.append(dict(group, params=rest))
        if mine:
            groups.append(
                dict(
                    group,
                    params=mine,
                    name=group["name"].replace("transformer", "head"),
                    lr=group["lr"] * cfg.train.head_lr_mult,
                )
            )
    return HybridOptimizer(groups, fused=cfg.optim.fused)


class FinetuneTrainer(BaseTrainer):
    """``FinetuneTrainer(FinetuneConfig, deepspeed_json).fit()`` -> the results (results.json)."""

    float_keys = frozenset({"images"})  # targets stay fp32: 0.3 / 0.6 / 0.9 soft scores are not exact in bf16
    evaluate_each_epoch = False  # val by train.eval_every steps / train.eval_minutes; test at the end

    def build_model(self) -> torch.nn.Module:
        cfg = self.cfg
        self.name = f"finetune {cfg.task}"
        backbone, self.tokenizer = load_export(cfg)
        self.backbone_config = backbone.config
        self.model_fingerprint = config_fingerprint(to_dict(backbone.config))
        self.images = KeyedImages(cfg.data.shards)
        self.task = make_task(cfg, self.tokenizer, self.images, self.run_dir)
        return self.task.build_model(backbone)

    def build_loaders(self) -> TaskLoader:
        t = self.cfg.train
        batch = t.eval_batch or t.micro_batch
        self._last_eval = time.monotonic()  # train.eval_minutes count from here
        self.eval_loaders = {s: self._loader(ex, batch, train=False) for s, ex in self.task.eval_splits.items()}
        return self._loader(self.task.train_examples, t.micro_batch, train=True)

    def _loader(self, examples, batch_size: int, train: bool) -> TaskLoader:
        t = self.cfg.train
        return TaskLoader(
            examples,
            self.images,
            self.task.image_keys,
            self.task.collate,
            loader_data_config(self.cfg.data, t.seed),
            batch_size,
            self.rank,
            self.world,
            train=train,
            seed=t.seed,
            shuffle=t.shuffle,
            device=self.device,
            images_per_example=self.task.images_per_example,
        )

    def build_optimizer(self, model) -> HybridOptimizer:
        return build_optimizer(model, self.cfg)

    def train_samples(self) -> int | None:
        return len(self.task.train_examples) or None  # none: the task reads no train split

    def samples_in(self, batch: dict) -> int:
        return len(batch["examples"])

    def flops_shape(self, batch: dict) -> tuple:
        return (len(batch["examples"]), *batch["images"].shape[-2:], batch["input_ids"].shape[1])

    def shape_flops(self, examples: int, height: int, width: int, text_len: int) -> float:
        """The backbone's FLOPs per image-text pair at the batch's padded sizes (every
        feature pixel) times the images per example; the head and retrieval's extra
        negative rows are left out."""
        pair = training_flops_analytic(self.backbone_config, (height, width), text_len, num_pixels=0, mlm_fraction=0)
        return examples * pair * self.task.images_per_example

    def client_state(self) -> dict:
        return {"model_fingerprint": self.model_fingerprint}

    def check_resumed(self, client: dict) -> None:
        if client.get("model_fingerprint") != self.model_fingerprint:
            raise CheckpointError(
                f"{self.ckpt_dir} was written for another model architecture than the "
                f"export {self.cfg.pretrained}: use a new run_dir"
            )

    def evaluate(self, splits=None) -> dict:
        out = {}
        for split in splits or list(self.eval_loaders):
            metrics = self.task.evaluate(
                self.engine, split, self.eval_loaders[split], self.to_device, model_tag=f"step {self.state['step']}"
            )
            self.logger.log(
                self.state["step"], split, {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            )
            out[split] = metrics
        return out

    def evaluate_during(self) -> None:
        """The validation splits, not at the last step (``finish`` evaluates every split)."""
        self._last_eval = time.monotonic()
        splits = self.task.validation_splits()
        if splits and self.state["step"] < self.total_steps:
            self.evaluate(splits)

    def finish_step(self, bar) -> None:
        """The loop's step bookkeeping, then the time rule: at a log step, evaluate when
        ``train.eval_minutes`` have passed since the last evaluation (rank 0's clock)."""
        super().finish_step(bar)
        t = self.cfg.train
        if (
            not t.eval_minutes
            or self.state["step"] % t.log_every
            or (t.eval_every and self.state["step"] % t.eval_every == 0)
        ):
            return
        due = torch.tensor([time.monotonic() - self._last_eval >= 60.0 * t.eval_minutes], device=collective_device())
        if self.world > 1:
            dist.broadcast(due, src=0)  # every rank must take the same branch: evaluation is collective
        if due.item():
            with self.health.slow_phase("evaluation", self.state["step"]):
                self.evaluate_during()

    def summary_metrics(self, values: dict) -> list[str]:
        """The task's score (VQA overall, NLVR2 accuracy, retrieval rsum), on every split
        that has one: not the last split's counts (a test split has no answers)."""
        return [self.task.main_metric]

    def outputs(self) -> dict:
        return {**super().outputs(), "results": self.run_dir / "results.json"}

    def finish(self) -> dict:
        return self.write_results(self.evaluate())

    def write_results(self, metrics: dict) -> dict:
        results = {
            "task": self.task.name,
            "pretrained": str(Path(self.cfg.pretrained).resolve()),
            "steps": self.state["step"],
            "train_seconds": round(self.state["train_seconds"], 2),
            "world_size": self.world,
            "train_examples": len(self.task.train_examples),
            "eval_examples": {s: len(ex) for s, ex in self.task.eval_splits.items()},
            "metrics": metrics,
            "main_metric": self.task.main_metric,
            "skipped": self.task.skipped,
            "files": sorted(p.name for p in self.run_dir.glob(f"{self.task.name}_*")),
        }
        if hasattr(self.task, "vocab") and self.is_main:
            self.task.vocab.save(self.run_dir / "answer_vocab.json")
        if self.is_main:
            (self.run_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        return results
