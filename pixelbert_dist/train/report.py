"""What the training loop reports: the train rows of ``metrics.jsonl`` / TensorBoard / W&B
(the log period's one all-reduce, the stragglers' all-gather, learning rates, grad norm,
memory, damaged and skipped samples), the FLOPs the throughput meter counts, the start
banner, the progress bar and the closing summary.

A mixin of ``BaseTrainer`` (``loop.py``): it reads the loop's state (``cfg``, ``state``,
``engine``, ``meter``, ``health``, ``logger``) and subclasses override its hooks
(``outputs``, ``summary_metrics``) as they do the loop's.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pixelbert_dist.config import to_dict
from pixelbert_dist.console import Progress, best_line, learning_rates_shown
from pixelbert_dist.metrics import format_values, peak_memory_gib

log = logging.getLogger(__name__)


class RunReport:
    """The loop's logging and console (see the module docstring)."""

    name = "train"  # the progress bar's label
    postfix_keys: tuple = ("loss",)  # train values shown on the progress bar

    def batch_flops(self, batch: dict) -> float:
        """Training FLOPs of this micro-batch at its own shapes: ``shape_flops`` once per
        distinct ``flops_shape``, then a dict lookup."""
        shape = self.flops_shape(batch)
        if shape is None:
            return 0.0
        if shape not in self._flops_by_shape:
            self._flops_by_shape[shape] = self.shape_flops(*shape)
        return self._flops_by_shape[shape]

    # -- logging ----------------------------------------------------------------------
    def damaged_samples(self) -> int | None:
        """Samples this rank's training loader replaced because they were damaged (the
        loader's ``damaged`` running count; summed over ranks in the log); None while the
        loader keeps no such count."""
        return getattr(self.train_loader, "damaged", None)

    def skipped_samples(self) -> dict[str, int]:
        """Samples of this rank's training loader that never reached a batch, by kind
        (``skipped_no_image``, ``skipped_no_caption``, ``skipped_truncated_tar``: the
        streamed loader's running counts; summed over ranks in the log); {} for loaders
        that keep none."""
        counts = getattr(self.train_loader, "skipped", None) or {}
        return {f"skipped_{kind}": int(n) for kind, n in counts.items()}

    def _log_train(self) -> None:
        damaged, skipped = self.damaged_samples(), self.skipped_samples()
        if damaged is not None:  # rides in the same all-reduce as the metric sums
            self._log_sums.add({"damaged_samples": damaged})
        self._log_sums.add(skipped)
        totals = self._log_sums.reduce()  # the log period's one all-reduce and host copy
        damaged = totals.pop("damaged_samples", None)
        skipped = {name: int(totals.pop(name)) for name in skipped}
        values = self.window_values(totals) if totals else {}
        values.update(self.meter.summary())
        steps = max(self._log_steps, 1)
        per_rank = (self.meter.data_time + self.meter.compute_time) / steps, self.meter.data_time / steps
        timings, labels = self.health.straggler_values(*per_rank)  # the log period's all-gather
        values.update(timings)
        for group in self.optimizer.param_groups:
            values[f"lr_{group.get('name', 'group')}"] = group["lr"]
        values["grad_norm"] = self.engine.get_global_grad_norm()
        scaler = getattr(self.engine.optimizer, "cur_scale", None)
        values["loss_scale"] = float(scaler) if scaler is not None else 1.0
        values["peak_mem_gib"] = peak_memory_gib(self.device)
        values["epoch"] = self.state["epoch"]
        values["nonfinite_skipped"] = self.state["nonfinite_skipped"]
        values["damaged_samples"] = damaged
        values.update(skipped)
        self.logger.log(self.state["step"], "train", values, labels)
        self.last_train = values
        self._log_sums.clear()
        self.meter.reset()
        self._log_steps = 0

    # -- console ----------------------------------------------------------------------
    def outputs(self) -> dict[str, Path]:
        """What the run leaves behind, for the closing summary (those that exist)."""
        return {"metrics": self.run_dir / "metrics.jsonl"}

    def _start_console(self) -> Progress:
        """Rank 0: the start banner, the config into TensorBoard; the progress display."""
        if self.is_main:
            self.logger.log_config(to_dict(self.cfg))
            log.info("%s", self._banner())
        return Progress(self.name, self.total_steps, self.state["step"], enabled=self.is_main)

    def _banner(self) -> str:
        t, step = self.cfg.train, self.state["step"]
        per_step = t.micro_batch * t.grad_accum * self.world
        start = f"resumed from {self.resume_dir} at step {step}" if step else "step 0 (no checkpoint resumed)"
        return "\n".join(
            [
                f"{self.name}: {self.total_steps} steps ({self.steps_per_epoch} per epoch) on {self.world} rank(s), "
                f"{self.device.type}",
                f"  batch {per_step} per step = micro {t.micro_batch} x grad_accum {t.grad_accum} "
                f"x {self.world} rank(s)",
                f"  precision {self.precision}, ZeRO stage {self.engine.zero_optimization_stage()}",
                f"  run folder {self.run_dir} (resolved config.yaml and deepspeed_config.json there)",
                f"  start: {start}; logs every {t.log_every} steps to " + " and ".join(["metrics.jsonl", *t.report_to]),
            ]
        )

    def _show_progress(self, bar: Progress) -> None:
        shown = {k: f"{self.last_train[k]:.3f}" for k in self.postfix_keys if k in self.last_train}
        shown.update(learning_rates_shown(self.last_train))
        bar.report(self.state["step"], shown)

    def summary_metrics(self, values: dict) -> list[str]:
        """The evaluation metrics the closing summary's ``best:`` line reports, given the
        last evaluation's values: every score (counts such as num_images are none)."""
        return [k for k in values if not k.startswith("num_")]

    def _print_summary(self, bar: Progress) -> None:
        if not self.is_main:
            return
        lines = [
            f"{self.name} done: {self.state['step']} steps in {bar.elapsed()}"
            f" ({self.state['nonfinite_skipped']} non-finite micro-batches skipped)"
        ]
        final = {k: self.last_train[k] for k in self.postfix_keys if k in self.last_train}
        if final:
            lines.append(f"  final train: {format_values(final)}")
        if self.logger.evaluations:
            step, split, values = self.logger.evaluations[-1]
            lines.append(f"  final {split} (step {step}): {format_values(values)}")
            best = best_line(self.logger.best(), self.summary_metrics(values))
            lines += [best] if best else []
        lines += [f"  {name}: {path}" for name, path in self.outputs().items() if path.exists()]
        log.info("%s", "\n".join(lines))
