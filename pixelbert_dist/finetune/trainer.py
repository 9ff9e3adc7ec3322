"""FinetuneTrainer: a task head on a pre-training export, trained with the pre-training
machinery (DeepSpeed engine + ZeRO, the hybrid SGD/AdamW optimiser, the lr schedule,
checkpoints with exact resume, GracefulExit, TensorBoard/JSONL logging), ending in a
results file: the official metrics of every evaluation split, the prediction files and
what was skipped and why."""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from tqdm import tqdm

from pixelbert_dist import checkpoint as ckpt
from pixelbert_dist.config import load_config, save_config, to_dict
from pixelbert_dist.data.text import load_tokenizer
from pixelbert_dist.distributed.ds_config import fill_deepspeed_config, precision_of, write_deepspeed_config
from pixelbert_dist.distributed.env import DistEnv, device_for, init_distributed
from pixelbert_dist.finetune.config import FinetuneConfig
from pixelbert_dist.finetune.data import KeyedImages, TaskLoader, loader_data_config
from pixelbert_dist.finetune.tasks import make_task
from pixelbert_dist.metrics import RunLogger
from pixelbert_dist.model import PixelBert, preset_config
from pixelbert_dist.model.pretrained import read_pretrained_config
from pixelbert_dist.train.optim import HybridOptimizer, param_groups
from pixelbert_dist.train.schedule import build_scheduler

log = logging.getLogger(__name__)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ARCH_FIELDS = ("backbone", "vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
               "max_position_embeddings")


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
    if cfg.data.vocab_dir and (folder / "vocab.txt").is_file() and \
            (folder / "vocab.txt").read_text() != (vocab_dir / "vocab.txt").read_text():
        raise ValueError(f"tokenizer mismatch: {vocab_dir / 'vocab.txt'} differs from the vocabulary the "
                         f"export {folder} was pre-trained with ({folder / 'vocab.txt'})")
    tokenizer = load_tokenizer(vocab_dir)
    if len(tokenizer) > arch.vocab_size:
        raise ValueError(f"tokenizer {vocab_dir} has {len(tokenizer)} tokens, the export {folder} only "
                         f"{arch.vocab_size} embeddings: wrong vocabulary for this export")
    return PixelBert.from_pretrained(folder, pixel_sample_size=0), tokenizer


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
            groups.append(dict(group, params=mine, name=group["name"].replace("transformer", "head"),
                               lr=group["lr"] * cfg.train.head_lr_mult))
    return HybridOptimizer(groups, fused=cfg.optim.fused)


class FinetuneTrainer:
    def __init__(self, cfg: FinetuneConfig, deepspeed_config, env: DistEnv | None = None):
        self.cfg = cfg.validate()
        self.env = init_distributed(env)
        self.device = device_for(self.env)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.run_dir, self.ckpt_dir = Path(cfg.run_dir), Path(cfg.run_dir) / "checkpoints"
        torch.manual_seed(cfg.train.seed)  # identical head init on every rank
        backbone, self.tokenizer = load_export(cfg)
        self.model_fingerprint = ckpt.config_fingerprint(to_dict(backbone.config))
        self.images = KeyedImages(cfg.data.shards)
        self.task = make_task(cfg, self.tokenizer, self.images, self.run_dir)
        model = self.task.build_model(backbone)
        self.train_loader = self._loader(self.task.train_examples, cfg.train.micro_batch, train=True)
        batch = cfg.train.eval_batch or cfg.train.micro_batch
        self.eval_loaders = {s: self._loader(ex, batch, train=False) for s, ex in self.task.eval_splits.items()}
        t = cfg.train
        self.steps_per_epoch = max(1, len(self.train_loader) // t.grad_accum)
        self.total_steps = t.max_steps or math.ceil(t.epochs * self.steps_per_epoch)
        self._setup_engine(model, deepspeed_config)
        torch.manual_seed(cfg.train.seed + 1000 * self.rank)
        self.state = {"step": 0, "epoch": 0, "train_seconds": 0.0}
        self._resume()
        self.logger = RunLogger(self.run_dir, self.is_main)

    def _loader(self, examples, batch_size: int, train: bool) -> TaskLoader:
        t = self.cfg.train
        return TaskLoader(examples, self.images, self.task.image_keys, self.task.collate,
                          loader_data_config(self.cfg.data, t.seed), batch_size, self.rank, self.world,
                          train=train, seed=t.seed, shuffle=t.shuffle, device=self.device,
                          images_per_example=self.task.images_per_example)

    def _setup_engine(self, model, deepspeed_config) -> None:
        t = self.cfg.train
        ds = fill_deepspeed_config(deepspeed_config, micro_batch=t.micro_batch, grad_accum=t.grad_accum,
                                   world_size=self.world, grad_clip=t.grad_clip, precision=t.precision)
        ckpt.prepare_resume(ds, self.ckpt_dir, t.resume, self.world)
        optimizer = build_optimizer(model, self.cfg)
        scheduler = build_scheduler(optimizer, self.cfg.schedule, self.steps_per_epoch, self.total_steps)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=ds)
        self.optimizer = optimizer
        self.dtype = _DTYPES[precision_of(ds)]
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
            write_deepspeed_config(ds, self.run_dir / "deepspeed_config.json")

    def _resume(self) -> None:
        client = ckpt.resume(self.engine, self.ckpt_dir, self.cfg.train.resume)
        if client is None:
            return
        if client.get("model_fingerprint") != self.model_fingerprint:
            raise ckpt.CheckpointError(f"{self.ckpt_dir} was written for another model architecture than the "
                                       f"export {self.cfg.pretrained}: use a new run_dir or train.resume=none")
        self.state = dict(client["trainer"])
        self.train_loader.load_state_dict(client["data"])
        log.info("resumed at step %d", self.state["step"])

    def to_device(self, batch: dict) -> dict:
        """Tensors to the device (nested dicts too); images in the engine's dtype, while
        targets stay fp32 (0.3 / 0.6 / 0.9 soft scores are not exact in bf16)."""
        out = {}
        for key, value in batch.items():
            if isinstance(value, dict):
                value = self.to_device(value)
            elif torch.is_tensor(value):
                value = value.to(self.device, non_blocking=True)
                if key == "images":
                    value = value.to(self.dtype)
            out[key] = value
        return out

    def save(self) -> None:
        client = {"trainer": self.state, "data": self.train_loader.state_dict(),
                  "model_fingerprint": self.model_fingerprint,
                  "config_fingerprint": ckpt.config_fingerprint(to_dict(self.cfg))}
        ckpt.save_checkpoint(self.engine, self.ckpt_dir, self.state["step"], client, self.cfg.train.keep_last)

    def evaluate(self, splits=None) -> dict:
        out = {}
        for split in splits or list(self.eval_loaders):
            metrics = self.task.evaluate(self.engine, split, self.eval_loaders[split], self.to_device)
            self.logger.log(self.state["step"], split, {k: v for k, v in metrics.items()
                                                        if isinstance(v, (int, float))})
            out[split] = metrics
        return out

    # -- the loop ---------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to total_steps, evaluate every split, write results.json (rank 0)."""
        self._sums = torch.zeros(2, dtype=torch.float64)  # loss sum, micro-batches: one log window
        bar = tqdm(total=self.total_steps, initial=self.state["step"], desc=f"finetune {self.task.name}",
                   disable=not self.is_main, dynamic_ncols=True)
        with ckpt.GracefulExit() as stop:
            while self.state["step"] < self.total_steps:
                if self._run_epoch(bar, stop):
                    bar.close()
                    return {"stopped_at_step": self.state["step"]}  # a signal: checkpoint saved
                if not self.cfg.train.eval_every and self.eval_loaders and self.state["step"] < self.total_steps:
                    self.evaluate(list(self.eval_loaders)[:1])
        bar.close()
        if self.cfg.train.save_every == 0 or self.state["step"] % self.cfg.train.save_every:
            self.save()
        results = self.write_results(self.evaluate())
        self.logger.close()
        return results

    def _run_epoch(self, bar, stop) -> bool:
        self.train_loader.set_epoch(self.state["epoch"])
        self.engine.train()
        sums, start = self._sums, time.perf_counter()
        for batch in self.train_loader:
            out = self.engine(self.to_device(batch))
            self.engine.backward(out["loss"])
            before = self.engine.global_steps
            self.engine.step()
            sums += torch.tensor([out["loss"].item(), 1.0], dtype=torch.float64)
            if self.engine.global_steps == before:
                continue  # inside a gradient accumulation window
            self.state["step"] = self.engine.global_steps
            self.state["train_seconds"] += time.perf_counter() - start  # evaluation not included
            bar.update(1)
            self._on_step(sums)
            start = time.perf_counter()
            if stop.should_exit():
                self.save()
                return True
            if self.state["step"] >= self.total_steps:
                return False
        self.state["epoch"] += 1
        return False

    def _on_step(self, sums: torch.Tensor) -> None:
        step, t = self.state["step"], self.cfg.train
        if step % t.log_every == 0 or step == self.total_steps:
            window = sums.clone()
            if dist.get_world_size() > 1:
                window = window.cuda() if dist.get_backend() == "nccl" else window
                dist.all_reduce(window)
            values = {"loss": float(window[0] / max(float(window[1]), 1.0)), "epoch": self.state["epoch"]}
            values.update({f"lr_{g['name']}": g["lr"] for g in self.optimizer.param_groups})
            self.logger.log(step, "train", values)
            sums.zero_()
        if t.eval_every and step % t.eval_every == 0 and step < self.total_steps:
            self.evaluate(list(self.eval_loaders)[:1])
        if t.save_every and step % t.save_every == 0:
            self.save()

    def write_results(self, metrics: dict) -> dict:
        results = {"task": self.task.name, "pretrained": str(Path(self.cfg.pretrained).resolve()),
                   "steps": self.state["step"], "train_seconds": round(self.state["train_seconds"], 2),
                   "world_size": self.world, "train_examples": len(self.task.train_examples),
                   "eval_examples": {s: len(ex) for s, ex in self.task.eval_splits.items()},
                   "metrics": metrics, "main_metric": self.task.main_metric, "skipped": self.task.skipped,
                   "files": sorted(p.name for p in self.run_dir.glob(f"{self.task.name}_*"))}
        if hasattr(self.task, "vocab") and self.is_main:
            self.task.vocab.save(self.run_dir / "answer_vocab.json")
        if self.is_main:
            (self.run_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        return results


# -- the entry point shared by launch/finetune_*.py -----------------------------------
def main(task: str, argv, file_args: list[tuple[str, str, str]], description: str) -> dict:
    """Parse ``--pretrained``, the task's files (``file_args``: flag, config key, help),
    ``--shards``, ``--config``, ``--deepspeed_config`` and key=value overrides; train."""
    repo = Path(__file__).resolve().parents[2]
    parser = argparse.ArgumentParser(description=description,
                                     epilog="overrides: dotted key=value, e.g. train.epochs=3 optim.lr=3e-5")
    parser.add_argument("--pretrained", help="pre-training export folder (config.json, model.safetensors)")
    parser.add_argument("--shards", nargs="+", help="shard folder(s) holding the task's images")
    for flag, key, text in file_args:
        parser.add_argument(flag, dest=key.replace(".", "__"), help=f"{text} ({key})")
    parser.add_argument("--config", help="fine-tuning config YAML (launch/configs/finetune_*.yaml)")
    parser.add_argument("--deepspeed_config", default=str(repo / "deepspeed_configs" / "zero2.json"),
                        help="ZeRO + precision JSON (precision: the run config's train.precision wins)")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    args = parser.parse_args(argv)
    # `--shards A B key=value`: nargs="+" swallows the overrides that follow; hand them back
    extra = [s for s in args.shards or [] if "=" in s and not Path(s).exists()]
    args.shards = [s for s in args.shards or [] if s not in extra]
    cfg = load_config(FinetuneConfig, args.config, [f"task={task}", *extra, *args.overrides])
    # paths are set as values, never parsed as YAML text
    if args.pretrained:
        cfg.pretrained = args.pretrained
    if args.shards:
        cfg.data.shards = list(args.shards)
    for _, key, _ in file_args:
        value = getattr(args, key.replace(".", "__"))
        if value is not None:
            section, name = key.split(".")
            setattr(getattr(cfg, section), name, value)
    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    trainer = FinetuneTrainer(cfg, args.deepspeed_config)
    results = trainer.fit()
    if trainer.is_main:
        print(json.dumps({"task": task, "metrics": results.get("metrics"), "skipped": results.get("skipped")}),
              flush=True)
    return results
