"""The one DeepSpeed training loop, shared by pre-training and fine-tuning.

``BaseTrainer`` owns everything a run needs whatever it trains: the engine (ZeRO,
precision, SyncBatchNorm, torch.compile), resume (universal too), the step with the
NaN/inf skip, checkpoints, the epoch loop with its clean stop on SIGTERM / SIGUSR1,
logging and the throughput/MFU meter. A subclass supplies the model, the loaders and
what to log, evaluate and leave behind (the hooks below), as torchtitan's Trainer does.
Steps count optimiser steps: one per accumulation window whose micro-batches ran.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from tqdm import tqdm

from pixelbert_dist import checkpoint as ckpt
from pixelbert_dist.collectives import all_reduce_sums, gather_objects
from pixelbert_dist.config import dump_config, to_dict
from pixelbert_dist.distributed.ds_config import fill_deepspeed_config, precision_of, write_deepspeed_config
from pixelbert_dist.distributed.env import DistEnv, device_for, init_distributed
from pixelbert_dist.metrics import RunLogger, ThroughputMeter, peak_memory_gib, peak_tflops
from pixelbert_dist.train import resume as resume_rule
from pixelbert_dist.train.run_dir import RunFolderError, RunLock, check_run_dir_writable, record_config, supersede_rows
from pixelbert_dist.train.schedule import apply_settings, build_scheduler, clamp_warmup, group_settings

log = logging.getLogger(__name__)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class NonFiniteLossError(RuntimeError):
    """Too many NaN/inf losses in a row: the run stops (on every rank) instead of diverging."""


def loss_is_bad(loss: torch.Tensor, max_loss: float) -> torch.Tensor:
    """NaN/inf, or a finite blow-up above ``train.max_loss``: skipped and counted alike."""
    return ~torch.isfinite(loss) | (loss.abs() > max_loss)


class BaseTrainer:
    """The loop. ``cfg`` has ``run_dir``, ``train`` (a LoopConfig) and ``validate()``."""

    name = "train"                          # the progress bar's label
    float_keys: frozenset | None = None     # floating tensors cast to the engine dtype (None: all)
    postfix_keys: tuple = ("loss",)         # train values shown on the progress bar

    def __init__(self, cfg, deepspeed_config, env: DistEnv | None = None):
        self.cfg = cfg.validate()
        self.env = init_distributed(env)
        self.device = device_for(self.env)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.run_dir, self.ckpt_dir = Path(cfg.run_dir), Path(cfg.run_dir) / "checkpoints"
        check_run_dir_writable(self.run_dir)
        t = cfg.train
        torch.manual_seed(t.seed)  # identical initial weights on every rank
        model = self.build_model()
        self.train_loader = self.build_loaders()
        self.steps_per_epoch = max(1, len(self.train_loader) // t.grad_accum)
        self.total_steps = t.max_steps or math.ceil(t.epochs * self.steps_per_epoch)
        self.run_lock, self._saved_step = None, None
        try:
            self._setup_engine(model, deepspeed_config)
        except BaseException:
            self._release_run()
            raise
        torch.manual_seed(t.seed + 1000 * self.rank)  # own dropout / pixel draws
        self.state = {"step": 0, "epoch": 0, "samples": 0, "nonfinite_skipped": 0, "train_seconds": 0.0}
        self.nonfinite_in_row = 0
        try:
            self._resume()
        except BaseException:
            self._release_run()
            raise
        self.logger = RunLogger(self.run_dir, self.is_main)
        self.meter = ThroughputMeter(self.flops_per_sample(), peak_tflops(self.precision, self.device), self.world)

    # -- hooks ------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        """The model to train (identical on every rank: the seed is set before)."""
        raise NotImplementedError

    def build_loaders(self):
        """This rank's training loader (``len``, ``set_epoch``, ``state_dict``); evaluation
        loaders are the subclass's own business."""
        raise NotImplementedError

    def build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        raise NotImplementedError

    def batch_sums(self, out: dict, batch: dict) -> dict[str, torch.Tensor]:
        """What one micro-batch adds to the logging window (sums, so ranks combine exactly)."""
        return {"loss": out["loss"].detach().double().cpu(), "n": torch.tensor(1.0, dtype=torch.float64)}

    def window_values(self, totals: dict[str, float]) -> dict[str, float]:
        """The logged train values from the window's sums over every rank."""
        return {"loss": totals["loss"] / max(totals["n"], 1.0)}

    def samples_in(self, batch: dict) -> int:
        raise NotImplementedError

    def flops_per_sample(self) -> float:
        return 0.0

    def client_state(self) -> dict:
        """Extra entries for every checkpoint."""
        return {}

    def check_resumed(self, client: dict) -> None:
        """Refuse a checkpoint this run cannot continue (raise ckpt.CheckpointError)."""

    def evaluate_during(self) -> None:
        """Every train.eval_every steps, or after every epoch when it is 0."""

    def finish(self):
        """After the last step and its checkpoint: final evaluation, exports; fit's result."""
        return {}

    def stopped(self):
        """fit's result when a signal stopped the run (its checkpoint is saved)."""
        return {"stopped_at_step": self.state["step"]}

    # -- setup ------------------------------------------------------------------------
    def _setup_engine(self, model: torch.nn.Module, deepspeed_config) -> None:
        t = self.cfg.train
        ds = fill_deepspeed_config(deepspeed_config, micro_batch=t.micro_batch, grad_accum=t.grad_accum,
                                   world_size=self.world, grad_clip=t.grad_clip, precision=t.precision)
        self._take_run_folder()
        if t.resume == "none":
            resume_rule.refuse_fresh_over_checkpoints(self.ckpt_dir)
        self.resume_dir = ckpt.prepare_resume(ds, self.ckpt_dir, t.resume, self.world, t.resume_universal)
        if self.resume_dir is not None:
            resume_rule.check_resumable(self.resume_dir, t.resume, to_dict(self.cfg), self.total_steps)
        if t.sync_bn and self.world > 1:
            if self.device.type == "cuda":
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:
                log.warning("train.sync_bn needs CUDA; keeping per-rank BatchNorm on %s", self.device)
        optimizer = self.build_optimizer(model)
        warmup_note = clamp_warmup(self.cfg.schedule, self.total_steps)[1]
        if warmup_note and self.is_main:
            log.warning(warmup_note)
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
            start = ckpt.read_meta(self.resume_dir)["step"] if self.resume_dir else 0
            record_config(self.run_dir / "config.yaml", dump_config(self.cfg), start)
            write_deepspeed_config(ds, self.run_dir / "deepspeed_config.json")

    # -- the run folder, resume and save (see train/run_dir.py and train/resume.py) -----
    def _take_run_folder(self) -> None:
        """Rank 0 locks the run folder; every rank learns whether it could."""
        error = None
        if self.is_main:
            try:
                self.run_lock = RunLock(self.run_dir).acquire()
            except (resume_rule.CheckpointError, RuntimeError, OSError) as err:
                error = str(err)
        error = gather_objects(error)[0]
        if error:
            raise RunFolderError(error)

    def _release_run(self) -> None:
        if getattr(self, "run_lock", None) is not None:
            self.run_lock.release()
            self.run_lock = None

    def _resume(self) -> None:
        t = self.cfg.train
        settings = group_settings(self.optimizer)  # the config's rates, before the checkpoint's replace them
        client = None if self.resume_dir is None else \
            ckpt.resume(self.engine, self.ckpt_dir, str(self.resume_dir), t.resume_universal, verify=False)
        if client is None:
            if self.is_main:
                supersede_rows(self.run_dir, 0)  # a fresh start: rows of an attempt that saved nothing
            return
        self.check_resumed(client)
        self.state.update(client["trainer"])  # older checkpoints lack newer counters
        self.train_loader.load_state_dict(resume_rule.replan_data_state(client["data"], self.train_loader.state_dict()))
        if self.train_loader.batches_done >= len(self.train_loader):
            self.state["epoch"] += 1  # saved on an epoch's last batch: the next epoch is due, not a replay
        changed = apply_settings(self.optimizer, self.scheduler, settings)
        self._saved_step = self.state["step"]
        if self.is_main:
            supersede_rows(self.run_dir, self.state["step"])
            log.info("resumed from %s at step %d", self.resume_dir, self.state["step"])
            if changed:
                log.warning("optimiser settings of this config applied from step %d on: %s",
                            self.state["step"], "; ".join(changed))

    def save(self) -> None:
        """A checkpoint of this step, once (a stop signal on a save step does not save again)."""
        if self._saved_step == self.state["step"]:
            return
        config = to_dict(self.cfg)
        client = {"trainer": self.state, "data": self.train_loader.state_dict(),
                  "config_fingerprint": ckpt.config_fingerprint(config), **self.client_state()}
        meta = {"config": config, "final": self.state["step"] >= self.total_steps}
        ckpt.save_checkpoint(self.engine, self.ckpt_dir, self.state["step"], client, self.cfg.train.keep_last,
                             meta=meta)
        self._saved_step = self.state["step"]

    def checkpoint_note(self) -> str:
        """What a run that stops on an error leaves behind, for its message."""
        latest = ckpt.read_latest(self.ckpt_dir)
        if latest:
            return f"the last checkpoint ({self.ckpt_dir / latest}) is untouched"
        return f"no checkpoint was written yet (train.save_every={self.cfg.train.save_every})"

    # -- steps ------------------------------------------------------------------------
    def to_device(self, batch: dict) -> dict:
        """Tensors to the device (nested dicts too); floating ones named in ``float_keys``
        (every one when None) in the engine's dtype, the rest as they are."""
        out = {}
        for key, value in batch.items():
            if isinstance(value, dict):
                value = self.to_device(value)
            elif torch.is_tensor(value):
                value = value.to(self.device, non_blocking=True)
                if value.is_floating_point() and (self.float_keys is None or key in self.float_keys):
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
        finite = (~loss_is_bad(loss.detach(), self.cfg.train.max_loss)).to(torch.float32).reshape(1)
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
                f"(train.max_nonfinite_in_row={limit}, or above train.max_loss={self.cfg.train.max_loss:g}): the "
                f"run stops; {self.checkpoint_note()}. Lower the learning rate (a resume with train.resume=latest "
                "applies a new optim.lr), check the data, or use bf16 instead of fp16.")

    # -- logging ----------------------------------------------------------------------
    def _log_train(self, sums: dict) -> None:
        values = self.window_values(all_reduce_sums(sums))
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

    def _on_step(self, sums: dict, bar) -> None:
        step, t = self.state["step"], self.cfg.train
        if step % t.log_every == 0 or step == self.total_steps:
            self._log_train(sums)
            sums.clear()
            bar.set_postfix({k: f"{self.last_train[k]:.3f}" for k in self.postfix_keys if k in self.last_train})
        if t.eval_every and step % t.eval_every == 0:
            self.evaluate_during()
        if t.save_every and step % t.save_every == 0:
            self.save()

    # -- the loop ---------------------------------------------------------------------
    def fit(self):
        """Train until total_steps, save, then ``finish()``; a signal stops it early with
        a checkpoint (``stopped()``)."""
        self.last_train, self.last_val = {}, {}
        sums: dict = {}
        bar = tqdm(total=self.total_steps, initial=self.state["step"], desc=self.name,
                   disable=not self.is_main, dynamic_ncols=True)
        with ckpt.GracefulExit() as stop:
            while self.state["step"] < self.total_steps:
                if self._run_epoch(sums, bar, stop):
                    bar.close()
                    self.logger.close()
                    self._release_run()
                    return self.stopped()
                if not self.cfg.train.eval_every:
                    self.evaluate_during()
        bar.close()
        if self.cfg.train.save_every == 0 or self.state["step"] % self.cfg.train.save_every:
            self.save()
        result = self.finish()
        self.logger.close()
        self._release_run()
        return result

    def _run_epoch(self, sums: dict, bar, stop) -> bool:
        """One pass over this rank's batches; True when a signal asked to stop."""
        self.train_loader.set_epoch(self.state["epoch"])
        self.engine.train()
        batches = iter(self.train_loader)
        step_start = time.perf_counter()  # train_seconds leaves evaluation and saving out
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
            for key, value in self.batch_sums(out, batch).items():
                sums[key] = sums.get(key, torch.zeros((), dtype=torch.float64)) + value
            samples = self.samples_in(batch)
            self.meter.add(samples, fetched - start, time.perf_counter() - fetched)
            self.state["samples"] += samples * self.world
            if self.engine.global_steps == steps_before:
                continue  # inside a gradient accumulation window
            self.state["step"] += 1
            self.state["train_seconds"] += time.perf_counter() - step_start
            bar.update(1)
            self._on_step(sums, bar)
            step_start = time.perf_counter()
            if stop.should_exit():
                self.save()
                return True
        return False
