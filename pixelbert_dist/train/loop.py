"""The one DeepSpeed training loop, shared by pre-training and fine-tuning.

``BaseTrainer`` owns everything a run needs whatever it trains: the engine (ZeRO,
precision, SyncBatchNorm, torch.compile), resume (universal too), the step with the
NaN/inf skip, checkpoints, the epoch loop with its clean stop on SIGTERM / SIGUSR1.
What it logs and prints (train rows, the throughput/MFU meter's FLOPs, banner, progress,
summary) is ``report.py``'s ``RunReport``. A subclass supplies the model, the loaders and
what to log, evaluate and leave behind (the hooks below), as torchtitan's Trainer does.
The accumulation window (NaN/inf skip, the one host sync) is ``window.py``; checkpoints,
the run folder and its record are one component, ``checkpoint.checkpointer.Checkpointer``:
the loop says what to save (``save``) and applies what a resume returns (``_resume``).
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

from pixelbert_dist.checkpoint.checkpointer import Checkpointer
from pixelbert_dist.checkpoint.engine_io import config_fingerprint
from pixelbert_dist.checkpoint.files import CheckpointError
from pixelbert_dist.checkpoint.run_folder import check_run_dir_writable
from pixelbert_dist.config import dump_config, to_dict
from pixelbert_dist.distributed.ds_config import deepspeed_config_text, fill_deepspeed_config, precision_of
from pixelbert_dist.distributed.env import DistEnv, device_for, init_distributed
from pixelbert_dist.metrics import MetricSums, RunLogger, ThroughputMeter, peak_tflops
from pixelbert_dist.model.pixelbert import set_activation_checkpointing
from pixelbert_dist.model.visual import sync_batchnorms
from pixelbert_dist.train import resume as resume_rule
from pixelbert_dist.train.health import RunHealth
from pixelbert_dist.train.report import RunReport
from pixelbert_dist.train.profiling import StepProfiler
from pixelbert_dist.train.schedule import apply_settings, build_scheduler, clamp_warmup, group_settings
from pixelbert_dist.train.signals import GracefulExit
from pixelbert_dist.train.window import AccumulationWindow, NonFiniteLossError, update_left_out

log = logging.getLogger(__name__)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class BaseTrainer(RunReport):
    """The loop. ``cfg`` has ``run_dir``, ``train`` (a LoopConfig) and ``validate()``;
    what it logs and prints is ``RunReport``'s (``report.py``)."""

    float_keys: frozenset | None = None  # floating tensors cast to the engine dtype (None: all)
    evaluate_each_epoch = True  # with train.eval_every=0, evaluate_during() after every epoch

    def __init__(self, cfg, deepspeed_config, env: DistEnv | None = None):
        self.cfg = cfg.validate()
        # long until the first step (DeepSpeed's first collectives, a resume's reads): RunHealth shortens it
        self.env = init_distributed(env, max(cfg.train.collective_timeout_s, cfg.train.slow_phase_timeout_s))
        self.device = device_for(self.env)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.run_dir = Path(cfg.run_dir)
        check_run_dir_writable(self.run_dir)
        t = cfg.train
        t.grad_accum = t.accumulation(self.world)  # train.global_batch, if set, for this world size
        self.checkpointer = Checkpointer(
            self.run_dir,
            keep_last=t.keep_last,
            every_steps=t.save_every,
            every_minutes=t.save_every_minutes,
            async_save=t.async_save,
            mirror=t.checkpoint_mirror,
        )
        self.ckpt_dir = self.checkpointer.folder
        torch.manual_seed(t.seed)  # identical initial weights on every rank
        model = self.build_model()
        if t.activation_checkpointing is not None:
            set_activation_checkpointing(model, t.activation_checkpointing)
        self.train_loader = self.build_loaders()
        t.check_fits(self.train_samples(), self.world)
        self.steps_per_epoch = max(1, len(self.train_loader) // t.grad_accum)
        self.total_steps = t.max_steps or math.ceil(t.epochs * self.steps_per_epoch)
        try:
            self._setup_engine(model, deepspeed_config)
        except BaseException:
            self.checkpointer.close()
            raise
        torch.manual_seed(t.seed + 1000 * self.rank)  # own dropout / pixel draws
        self.state = {"step": 0, "epoch": 0, "samples": 0, "nonfinite_skipped": 0, "train_seconds": 0.0}
        self.nonfinite_in_row = 0
        try:
            self._resume()
            self.checkpointer.record_run(
                dump_config(self.cfg), {"deepspeed_config.json": deepspeed_config_text(self.ds_config)}
            )
        except BaseException:
            self.checkpointer.close()
            raise
        self.logger = RunLogger(self.run_dir, self.is_main, self.state["step"], t.report_to, t.wandb_project)
        self.profiler = StepProfiler(t.profile_range(), self.run_dir, self.rank, self.device, self.total_steps)
        self._init_hot_loop()

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

    def train_samples(self) -> int | None:
        """Training samples in one epoch over all ranks; None: not known before reading."""
        return None

    def batch_sums(self, out: dict, batch: dict) -> dict:
        """What one micro-batch adds to the logging window (sums, so ranks combine exactly):
        tensors stay on the device until log time, plain numbers are host-side counts."""
        return {"loss": out["loss"].detach(), "n": 1}

    def window_values(self, totals: dict[str, float]) -> dict[str, float]:
        """The logged train values from the window's sums over every rank."""
        return {"loss": totals["loss"] / max(totals["n"], 1.0)}

    def samples_in(self, batch: dict) -> int:
        raise NotImplementedError

    def flops_shape(self, batch: dict) -> tuple | None:
        """What a micro-batch's FLOPs depend on (its padded sizes), hashable; None: not counted."""
        return None

    def shape_flops(self, *shape) -> float:
        """Training FLOPs of a micro-batch of ``flops_shape`` (asked once per distinct shape)."""
        return 0.0

    def client_state(self) -> dict:
        """Extra entries for every checkpoint."""
        return {}

    def check_resumed(self, client: dict) -> None:
        """Refuse a checkpoint this run cannot continue (raise CheckpointError)."""

    def evaluate_during(self) -> None:
        """Every train.eval_every steps, or after every epoch when it is 0 (and
        ``evaluate_each_epoch``)."""

    def finish(self):
        """After the last step and its checkpoint: final evaluation, exports; fit's result."""
        return {}

    def stopped(self):
        """fit's result when a signal stopped the run (its checkpoint is saved)."""
        return {"stopped_at_step": self.state["step"]}

    # -- setup ------------------------------------------------------------------------
    def _setup_engine(self, model: torch.nn.Module, deepspeed_config) -> None:
        t = self.cfg.train
        ds = fill_deepspeed_config(
            deepspeed_config,
            micro_batch=t.micro_batch,
            grad_accum=t.grad_accum,
            world_size=self.world,
            grad_clip=t.grad_clip,
            precision=t.precision,
        )
        self.checkpointer.take_folder()
        if t.resume == "none":
            resume_rule.refuse_fresh_over_checkpoints(self.ckpt_dir)
        self.resume_dir = self.checkpointer.choose(t.resume, ds, self.world, t.resume_universal)
        if self.resume_dir is not None:
            resume_rule.check_resumable(self.resume_dir, t.resume, to_dict(self.cfg), self.total_steps)
        if t.sync_bn and self.world > 1:
            if self.device.type == "cuda":
                model = sync_batchnorms(model)  # keeps the checkpoint-recompute guard
            else:
                log.warning("train.sync_bn needs CUDA; keeping per-rank BatchNorm on %s", self.device)
        optimizer = self.build_optimizer(model)
        warmup_note = clamp_warmup(self.cfg.schedule, self.total_steps)[1]
        if warmup_note and self.is_main:
            log.warning(warmup_note)
        scheduler = build_scheduler(optimizer, self.cfg.schedule, self.steps_per_epoch, self.total_steps)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds
        )
        self.checkpointer.attach(self.engine)
        self.optimizer = optimizer  # the base optimiser: its groups carry names and rules
        self.batchnorms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if t.compile:
            self.engine.compile()
        self.precision = precision_of(ds)
        self.dtype = _DTYPES[self.precision]
        self.ds_config = ds

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

    # -- the hot loop: one host sync per optimizer step ---------------------------------
    def train_micro_batch(self, batch: dict, data_seconds: float = 0.0) -> bool:
        """One micro-batch: forward and backward; at the accumulation boundary the optimiser
        step (DeepSpeed clips, scales the loss, reduces the gradients), or the skip of the
        whole window when a loss in it was NaN/inf on any rank (``window.py``). True when a
        step was applied."""
        start = time.perf_counter()
        self.window.open()
        out = self.engine(self.to_device(batch))
        self.engine.backward(out["loss"])
        samples = self.samples_in(batch)
        self.window.add(out["loss"], self.batch_sums(out, batch), samples)
        # Asked before engine.step(): DeepSpeed advances its micro-step counter there.
        if self.engine.is_gradient_accumulation_boundary():
            applied = self._end_window()
        else:
            self.engine.step()  # DeepSpeed only counts the micro-step here
            applied = False
        self.meter.add(samples, data_seconds, time.perf_counter() - start, self.batch_flops(batch))
        return applied

    def _end_window(self) -> bool:
        signalled = self.stop is not None and self.stop.requested
        minutes_due = self.is_main and self.checkpointer.minutes_due()  # rank 0's clock decides for all
        nonfinite, stop, self.save_due_agreed = self.window.agree(self.world, signalled, minutes_due)
        self.stop_agreed = self.stop.agreed(stop) if self.stop is not None else stop
        if nonfinite:
            self._skip_window(nonfinite)
        else:
            self.engine.step()
            self.nonfinite_in_row = 0
            self._log_sums.merge(self.window.sums)
            self.state["samples"] += self.window.samples * self.world
        self.window.reset()
        return not nonfinite

    def _skip_window(self, nonfinite: int) -> None:
        """Drop the whole accumulation window. Its backward passes have already added the
        NaN/inf gradients into DeepSpeed's accumulated (for ZeRO 1-3 partitioned, perhaps
        offloaded) gradients, so dropping only the bad micro-batch is not possible.
        ``engine.step()`` still runs, so DeepSpeed releases those gradients and advances
        its micro-step counter as it does at every boundary for every stage, but without
        the update (the base optimiser's ``step`` is a no-op for this call) and without
        the lr schedule's step: weights, optimiser state and schedule stay as they were."""
        with update_left_out(self.engine, self.optimizer):
            self.engine.step()
        self.window.restore_batchnorm()
        self.state["nonfinite_skipped"] += nonfinite
        self.nonfinite_in_row += nonfinite
        limit = self.cfg.train.max_nonfinite_in_row
        log.warning(
            "non-finite loss in %d micro-batch(es) after step %d: the accumulation window is skipped "
            "(%d in a row, %d in all)",
            nonfinite,
            self.state["step"],
            self.nonfinite_in_row,
            self.state["nonfinite_skipped"],
        )
        if self.nonfinite_in_row >= limit:
            raise NonFiniteLossError(
                f"{self.nonfinite_in_row} NaN/inf losses in a row at step {self.state['step']} "
                f"(train.max_nonfinite_in_row={limit}, or above train.max_loss={self.cfg.train.max_loss:g}): the "
                f"run stops; {self.checkpointer.note()}. Lower the learning rate (a resume with train.resume=latest "
                "applies a new optim.lr), check the data, or use bf16 instead of fp16."
            )

    # -- the hot loop's state ----------------------------------------------------------
    def _init_hot_loop(self) -> None:
        self.meter = ThroughputMeter(peak_tflops(self.precision, self.device), self.world)
        self._flops_by_shape: dict = {}
        self._log_sums = MetricSums()
        self.window = AccumulationWindow(self.batchnorms, self.device, self.cfg.train.max_loss)
        self.last_train, self.last_val = {}, {}
        self.stop: GracefulExit | None = None  # fit's signal flags, agreed at each step's boundary
        self.stop_agreed = False
        self.save_due_agreed = False  # train.save_every_minutes, agreed in the step's all-reduce
        self.health = RunHealth(self.cfg.train, self.rank, self.world)  # hang watchdog, timeouts, stragglers
        self._log_steps = 0  # optimizer steps in the log period

    def _on_step(self, bar) -> None:
        step, t = self.state["step"], self.cfg.train
        if step % t.log_every == 0 or step == self.total_steps:
            self._log_train()
            self._show_progress(bar)
        if t.eval_every and step % t.eval_every == 0:
            with self.health.slow_phase("evaluation", step):
                self.evaluate_during()
        if self.checkpointer.due(step, self.save_due_agreed):  # save_due: rank 0's clock, agreed
            with self.health.slow_phase("save", step):
                self.save()

    def finish_step(self, bar) -> None:
        """After an applied optimiser step: count it, advance the bar, log / evaluate / save
        on their periods."""
        self.state["step"] += 1
        self._log_steps += 1
        self.health.step_done(self.state["step"])
        bar.update()
        self._on_step(bar)
        self.profiler.after_step(self.state["step"])  # the step's logging and saving are its own

    # -- the loop ---------------------------------------------------------------------
    def fit(self):
        """Train until total_steps, save, then ``finish()``; a signal stops it early with
        a checkpoint (``stopped()``)."""
        bar = self._start_console()
        self.profiler.after_step(self.state["step"])
        with self.health:
            with GracefulExit() as self.stop:
                while self.state["step"] < self.total_steps:
                    if self._run_epoch(bar):
                        self.profiler.close()
                        bar.close()
                        self.logger.close()
                        self.checkpointer.close()  # a save in flight completes before the exit
                        return self.stopped()
                    if not self.cfg.train.eval_every and self.evaluate_each_epoch:
                        with self.health.slow_phase("evaluation", self.state["step"]):
                            self.evaluate_during()
            self.profiler.close()
            bar.close()
            with self.health.slow_phase("the final save and evaluation", self.state["step"]):
                self.save()  # the last step's, unless it was just saved
                self.checkpointer.wait()  # finish() may export from it
                result = self.finish()
        self._print_summary(bar)
        self.logger.close()
        self.checkpointer.close()
        return result

    def _run_epoch(self, bar) -> bool:
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
            if self.train_micro_batch(batch, time.perf_counter() - start):
                self.state["train_seconds"] += time.perf_counter() - step_start
                self.finish_step(bar)
                step_start = time.perf_counter()
            # else: inside a gradient accumulation window, or a skipped one (NaN/inf)
            if self.stop_agreed:  # agreed by every rank in the step's all-reduce
                with self.health.slow_phase("save on a stop signal", self.state["step"]):
                    self.save()
                return True
        return False

    # -- checkpoints: what is saved, and what a resume restores ----------------------------
    def save(self) -> None:
        """A checkpoint of this step (once: a stop signal on a save step does not save again)."""
        config = to_dict(self.cfg)
        data = self.train_loader.state_dict()
        gathered = getattr(self.train_loader, "gathered_state", dict)()  # a collective, on every rank
        client = {
            "trainer": self.state,
            "data": {**data, **gathered},
            "config_fingerprint": config_fingerprint(config),
            **self.client_state(),
        }
        meta = {"config": config, "final": self.state["step"] >= self.total_steps}
        self.checkpointer.save(self.state["step"], client, rank_state={"data": data}, meta=meta)

    def _resume(self) -> None:
        settings = group_settings(self.optimizer)  # the config's rates, before the checkpoint's replace them
        client = self.checkpointer.resume()
        if client is None:
            return
        self.check_resumed(client)
        self.state.update(client["trainer"])  # older checkpoints lack newer counters
        self._resume_data(client)
        if self.train_loader.batches_done >= len(self.train_loader):
            self.state["epoch"] += 1  # saved on an epoch's last batch: the next epoch is due, not a replay
        changed = apply_settings(self.optimizer, self.scheduler, settings)
        if self.is_main and changed:
            log.warning(
                "optimiser settings of this config applied from step %d on: %s", self.state["step"], "; ".join(changed)
            )

    def _resume_data(self, client: dict) -> None:
        """This rank's own saved loader position (a streamed one differs per rank: a skipped
        damaged sample shifts that rank's cursors); rank 0's, re-planned, after a world-size
        change or from a checkpoint that kept only rank 0's; with train.resume_universal, also a
        streamed one of another worker count or batch size. A loader that cannot continue
        from it is a refused resume (one line naming what changed), not a traceback."""
        state, now = (client.get("rank_state") or {}).get("data"), self.train_loader.state_dict()
        try:
            if state is None or (self.cfg.train.resume_universal and resume_rule.reshaped(state, now)):
                state = resume_rule.replan_data_state(client["data"], now, say=self.is_main)
            self.train_loader.load_state_dict(state)
        except ValueError as err:
            raise CheckpointError(f"cannot resume {self.resume_dir}: {err}") from None
