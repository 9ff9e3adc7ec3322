"""The pre-training Trainer: setup, train_step, the loop with logging, evaluation,
checkpoints and a clean stop on SIGTERM / SIGUSR1."""
from __future__ import annotations

import dataclasses
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
from pixelbert_dist.config import save_config, to_dict
from pixelbert_dist.data.loader import build_loader
from pixelbert_dist.data.text import load_tokenizer
from pixelbert_dist.distributed.ds_config import fill_deepspeed_config, precision_of, write_deepspeed_config
from pixelbert_dist.distributed.env import DistEnv, device_for, init_distributed
from pixelbert_dist.metrics import RunLogger, ThroughputMeter, peak_memory_gib, peak_tflops
from pixelbert_dist.model import (PixelBert, build_model, load_bert_checkpoint, load_torchvision_backbone,
                                  load_visual_weights, training_flops_per_sample)
from pixelbert_dist.train.config import ModelSection, RunConfig
from pixelbert_dist.train.evaluate import batch_metrics, evaluate, reduce_metrics
from pixelbert_dist.train.export import export_from_engine
from pixelbert_dist.train.optim import build_optimizer
from pixelbert_dist.train.schedule import build_scheduler

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many NaN/inf losses in a row: the run stops (on every rank) instead of diverging."""


def check_run_dir_writable(run_dir: Path) -> None:
    """Fail before any training, on every rank alike (so no rank waits for a failed one),
    when the run folder cannot be created or written. Creates nothing: a run refused later
    (a contradictory config, say) leaves no empty folder behind."""
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        problem = f"{existing} is a file"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable"
    else:
        return
    raise ValueError(f"run_dir={str(run_dir)!r} is not a writable folder ({problem}): checkpoints, logs "
                     "and the export go there")


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_run_model(section: ModelSection, vocab_size: int | None = None) -> PixelBert:
    model = build_model(section.preset, **section.overrides)
    if vocab_size is not None and vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {vocab_size} tokens but model preset {section.preset!r} has "
                         f"vocab_size={model.config.vocab_size}: set model.overrides.vocab_size or data.vocab_dir")
    if section.bert_dir:
        log.info("BERT weights: %s", load_bert_checkpoint(model, section.bert_dir))
    if section.cnn_weights:
        log.info("CNN weights: %s", load_torchvision_backbone(model, section.cnn_weights))
    if section.visual_weights:
        log.info("visual weights: %s", load_visual_weights(model, section.visual_weights))
    freeze_prefixes(model, section.freeze)
    return model


def freeze_prefixes(model: PixelBert, prefixes: list[str]) -> None:
    """requires_grad=False for every parameter under the prefixes (the optimiser then
    leaves them out, and ZeRO neither reduces nor stores state for them)."""
    for prefix in prefixes:
        hits = [p for name, p in model.named_parameters() if name.startswith(prefix)]
        if not hits:
            raise ValueError(f"model.freeze: no parameter name starts with {prefix!r}")
        for param in hits:
            param.requires_grad_(False)


class Trainer:
    def __init__(self, cfg: RunConfig, deepspeed_config, env: DistEnv | None = None):
        self.cfg = cfg.validate()
        self.env = init_distributed(env)
        self.device = device_for(self.env)
        self.run_dir, self.ckpt_dir = Path(cfg.run_dir), Path(cfg.run_dir) / "checkpoints"
        self.is_main = dist.get_rank() == 0
        self.world = dist.get_world_size()
        check_run_dir_writable(self.run_dir)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.tokenizer = load_tokenizer(cfg.data.vocab_dir)
        model = build_run_model(cfg.model, len(self.tokenizer))
        self._setup_data()
        self._setup_engine(model, deepspeed_config)
        torch.manual_seed(cfg.train.seed + 1000 * dist.get_rank())  # own dropout / pixel draws
        self.state = {"step": 0, "epoch": 0, "samples": 0, "nonfinite_skipped": 0}
        self.nonfinite_in_row = 0
        self._resume()
        self.logger = RunLogger(self.run_dir, self.is_main)
        self._setup_meter()

    # -- setup ------------------------------------------------------------------------
    def _setup_data(self) -> None:
        cfg, rank = self.cfg, dist.get_rank()
        micro = cfg.train.micro_batch
        self.train_loader = build_loader(cfg.data, cfg.data.train_shards, micro, rank, self.world,
                                         self.device, train=True, tokenizer=self.tokenizer)
        self.val_loader = self.probe_loader = None
        if cfg.data.val_shards:
            # Validation keeps MLM masking and ITM negatives (seeded, so every evaluation
            # sees the same draws) but no shuffle or flip; repeats are flagged is_pad.
            val_cfg = dataclasses.replace(cfg.data, shuffle=False, hflip=False, drop_last=False)
            self.val_loader = build_loader(val_cfg, cfg.data.val_shards, micro, rank, self.world,
                                           self.device, train=True, tokenizer=self.tokenizer)
            if cfg.train.retrieval_size:
                self.probe_loader = build_loader(val_cfg, cfg.data.val_shards, cfg.train.retrieval_size, 0, 1,
                                                 self.device, train=False, tokenizer=self.tokenizer)
        self.steps_per_epoch = max(1, len(self.train_loader) // cfg.train.grad_accum)
        t = cfg.train
        self.total_steps = t.max_steps or math.ceil(t.epochs * self.steps_per_epoch)

    def _setup_engine(self, model: PixelBert, deepspeed_config) -> None:
        t = self.cfg.train
        ds = fill_deepspeed_config(deepspeed_config, micro_batch=t.micro_batch, grad_accum=t.grad_accum,
                                   world_size=self.world, grad_clip=t.grad_clip, precision=t.precision)
        self.resume_dir = ckpt.prepare_resume(ds, self.ckpt_dir, t.resume, self.world, t.resume_universal)
        if t.sync_bn and self.world > 1:
            if self.device.type == "cuda":
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:
                log.warning("train.sync_bn needs CUDA; keeping per-rank BatchNorm on %s", self.device)
        optimizer = build_optimizer(model, self.cfg.optim)
        scheduler = build_scheduler(optimizer, self.cfg.schedule, self.steps_per_epoch, self.total_steps)
        self.engine, _, _, self.scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 lr_scheduler=scheduler, config=ds)
        self.optimizer = optimizer  # the base optimiser: its groups carry names and rules
        self.batchnorms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if t.compile:
            self.engine.compile()
        self.precision = precision_of(ds)
        self.dtype = _DTYPES[self.precision]
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
            write_deepspeed_config(ds, self.run_dir / "deepspeed_config.json")

    def _setup_meter(self) -> None:
        d = self.cfg.data
        model_cfg = self.engine.module.config
        hw = (d.image_shorter, d.image_max)  # the common padded size class of a batch
        flops = training_flops_per_sample(model_cfg, (math.ceil(hw[0] / 64) * 64, math.ceil(hw[1] / 64) * 64),
                                          d.max_text_len)
        self.meter = ThroughputMeter(flops, peak_tflops(self.precision, self.device), self.world)

    def _resume(self) -> None:
        client = ckpt.resume(self.engine, self.ckpt_dir, self.cfg.train.resume, self.cfg.train.resume_universal)
        if client is None:
            return
        self.state.update(client["trainer"])  # older checkpoints lack newer counters
        self.train_loader.load_state_dict(client["data"])
        if self.is_main:
            log.info("resumed from %s at step %d", self.resume_dir, self.state["step"])

    # -- steps ------------------------------------------------------------------------
    def to_device(self, batch: dict) -> dict:
        out = {}
        for key, value in batch.items():
            if torch.is_tensor(value):
                value = value.to(self.device, non_blocking=True)
                if value.is_floating_point():
                    value = value.to(self.dtype)
            out[key] = value
        return out

    def train_step(self, batch: dict) -> dict | None:
        """One micro-batch: forward, backward; DeepSpeed steps the optimiser at the
        accumulation boundary (and clips, scales the loss, reduces the gradients).
        Returns None when the loss was NaN/inf on any rank: every rank then skips it."""
        running_stats = self._batchnorm_stats()
        out = self.engine(self.to_device(batch))
        if not self._finite_on_all_ranks(out["loss"]):
            self._skip_nonfinite(running_stats)
            return None
        self.nonfinite_in_row = 0
        self.engine.backward(out["loss"])
        self.engine.step()
        return out

    def _finite_on_all_ranks(self, loss: torch.Tensor) -> bool:
        # One tiny all-reduce per micro-batch: the ranks must agree, or one would wait in
        # backward's gradient reduction for a rank that skipped.
        finite = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item())

    def _batchnorm_stats(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(buffer, copy) of every BatchNorm running statistic: a NaN batch's forward has
        already folded NaN into them, and a skipped step must leave no trace."""
        return [(buf, buf.clone()) for module in self.batchnorms if module.training for buf in module.buffers()]

    def _skip_nonfinite(self, running_stats) -> None:
        with torch.no_grad():
            for buf, saved in running_stats:
                buf.copy_(saved)
        self.state["nonfinite_skipped"] += 1
        self.nonfinite_in_row += 1
        limit = self.cfg.train.max_nonfinite_in_row
        log.warning("non-finite loss at step %d: micro-batch skipped (%d in a row, %d in all)",
                    self.state["step"], self.nonfinite_in_row, self.state["nonfinite_skipped"])
        if self.nonfinite_in_row >= limit:
            raise NonFiniteLossError(
                f"{self.nonfinite_in_row} NaN/inf losses in a row at step {self.state['step']} "
                f"(train.max_nonfinite_in_row={limit}): the run stops; the last checkpoint in {self.ckpt_dir} "
                "is untouched. Lower the learning rate, check the data, or use bf16 instead of fp16.")

    def save(self) -> None:
        client = {"trainer": self.state, "data": self.train_loader.state_dict(),
                  "config_fingerprint": ckpt.config_fingerprint(to_dict(self.cfg))}
        ckpt.save_checkpoint(self.engine, self.ckpt_dir, self.state["step"], client, self.cfg.train.keep_last)

    def _log_train(self, sums: dict) -> None:
        values = reduce_metrics(sums)
        values.update(self.meter.summary())
        for group in self.optimizer.param_groups:
            values[f"lr_{group.get('name', 'group')}"] = group["lr"]
        values["grad_norm"] = self.engine.get_global_grad_norm()
        scaler = getattr(self.engine.optimizer, "cur_scale", None)
        values["loss_scale"] = float(scaler) if scaler is not None else 1.0
        values["peak_mem_gib"] = peak_memory_gib(self.device)
        values["epoch"] = self.state["epoch"]
        values["nonfinite_skipped"] = self.state["nonfinite_skipped"]
        self.logger.log(self.state["step"], "train", values)
        self.last_train = values
        self.meter.reset()

    def evaluate(self) -> dict:
        if self.val_loader is None:
            return {}
        values = evaluate(self.engine, self.val_loader, self.probe_loader, self.to_device,
                          self.cfg.train.eval_batches)
        self.logger.log(self.state["step"], "val", values)
        self.last_val = {**values, "step": self.state["step"]}
        return values

    def _on_step(self, sums: dict, bar) -> None:
        step = self.state["step"]
        t = self.cfg.train
        if step % t.log_every == 0 or step == self.total_steps:
            self._log_train(sums)
            for v in sums.values():
                v.zero_()
            if bar is not None:
                bar.set_postfix(loss=f"{self.last_train['loss']:.3f}", itm=f"{self.last_train['itm_acc']:.2f}")
        if t.eval_every and step % t.eval_every == 0:
            self.evaluate()
        if t.save_every and step % t.save_every == 0:
            self.save()

    # -- the loop ---------------------------------------------------------------------
    def fit(self) -> dict:
        """Train until total_steps; returns the last validation metrics."""
        self.last_train, self.last_val = {}, {}
        sums: dict = {}
        bar = tqdm(total=self.total_steps, initial=self.state["step"], desc="pretrain",
                   disable=not self.is_main, dynamic_ncols=True)
        with ckpt.GracefulExit() as stop:
            while self.state["step"] < self.total_steps:
                if self._run_epoch(sums, bar, stop):
                    bar.close()
                    return self.last_val  # stopped by a signal, checkpoint saved
                if not self.cfg.train.eval_every:
                    self.evaluate()
        bar.close()
        if self.cfg.train.save_every == 0 or self.state["step"] % self.cfg.train.save_every:
            self.save()
        if self.last_val.get("step") != self.state["step"]:
            self.evaluate()  # the final model, whatever the eval period
        if self.cfg.train.export:
            export_from_engine(self.engine, self.ckpt_dir, self.run_dir / "export", self.tokenizer)
        self.logger.close()
        return self.last_val

    def _run_epoch(self, sums: dict, bar, stop) -> bool:
        """One pass over this rank's batches; True when a signal asked to stop."""
        self.train_loader.set_epoch(self.state["epoch"])
        self.engine.train()
        batches = iter(self.train_loader)
        while self.state["step"] < self.total_steps:
            start = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                self.state["epoch"] += 1
                return False
            fetched = time.perf_counter()
            steps_before = self.engine.global_steps
            out = self.train_step(batch)
            if out is None:
                continue  # a NaN/inf loss, skipped on every rank and counted
            for key, value in batch_metrics(out, batch).items():
                sums[key] = sums.get(key, torch.zeros((), dtype=torch.float64)) + value.double().cpu()
            self.meter.add(len(batch["keys"]), fetched - start, time.perf_counter() - fetched)
            self.state["samples"] += len(batch["keys"]) * self.world
            if self.engine.global_steps == steps_before:
                continue  # inside a gradient accumulation window
            self.state["step"] += 1
            bar.update(1)
            self._on_step(sums, bar)
            if stop.should_exit():
                self.save()
                return True
        return False
