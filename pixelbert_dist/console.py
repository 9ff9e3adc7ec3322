"""What a run prints: INFO lines from rank 0 (WARNING and up from the others), and not the
stack's repeated noise. Each filter names the message it drops; errors are never dropped.

Called by the entry points before DeepSpeed is imported: its logger ("DeepSpeed") and
torch's build logger get their filters before their first line."""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import warnings

# (logger, message pattern, dropped on rank 0 too?). Each one is said once by rank 0, or
# said by the banner instead, or is a caution the shipped configs answer on purpose.
LOG_NOISE = [
    ("DeepSpeed", r"Setting accelerator to CPU", False),  # once per rank
    ("torch.utils.cpp_extension", r"No CUDA runtime is found", False),  # once per rank per op build
    ("DeepSpeed", r"You are using ZeRO with an untested optimizer", True),  # the hybrid optimiser: tested
]
WARNING_NOISE = [
    # the run config's train.precision wins over the DeepSpeed JSON's: the banner says which ran
    (r".* enables \w+; the run config asks \w+, which wins", UserWarning),
    # DeepSpeed's own calls into torch.distributed, nothing the user can change
    (r"`torch\.distributed\.\w+` is deprecated", FutureWarning),
]


class DropMessages(logging.Filter):
    """Drops records below ERROR whose message matches ``pattern``."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not self.pattern.search(record.getMessage())


def launch_rank() -> int:
    """This process's global rank as the launcher set it (0 when run alone)."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def setup_console(rank: int | None = None) -> None:
    """Logging format and levels, and the noise filters, for this rank."""
    rank = launch_rank() if rank is None else rank
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for name, pattern, everywhere in LOG_NOISE:
        if everywhere or rank != 0:
            logging.getLogger(name).addFilter(DropMessages(pattern))
    for pattern, category in WARNING_NOISE:
        warnings.filterwarnings("ignore", message=pattern, category=category)


# The optimiser groups' rates as the console shows them, under the config key that sets
# each (optim.cnn_lr, optim.lr; fine-tuning's heads run at optim.lr x train.head_lr_mult).
LR_LABELS = {
    "cnn_lr": ("lr_cnn",),
    "lr": ("lr_transformer_decay", "lr_transformer_no_decay"),
    "head_lr": ("lr_head_decay", "lr_head_no_decay"),
}


def learning_rates_shown(values: dict) -> dict[str, str]:
    """The CNN's and the transformer's learning rates (and the heads'), labelled, from a
    train log row's ``lr_<group>`` values: one number under the name ``lr`` was the CNN's
    SGD rate, not the ``optim.lr`` the user set."""
    shown = {}
    for label, groups in LR_LABELS.items():
        rate = next((values[g] for g in groups if g in values), None)
        if rate is not None:
            shown[label] = f"{rate:.2e}"
    return shown


def best_line(best: dict[str, tuple[float, int]], metrics) -> str | None:
    """The closing summary's ``best:`` line: ``split/metric=value (step s)`` for the
    metrics named, from ``RunLogger.best()``; None when none was evaluated."""
    wanted = set(metrics)
    shown = [f"{k}={v:.4g} (step {s})" for k, (v, s) in best.items() if k.split("/", 1)[1] in wanted]
    return "  best: " + ", ".join(shown) if shown else None


def duration(seconds: float) -> str:
    """``1h02m``, ``3m41s``, ``12s``."""
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """A run's progress on rank 0: a tqdm bar on a terminal; elsewhere (Slurm logs, pipes)
    no bar, and one plain line per ``report`` (each log period) with steps/s, ETA and the
    values shown, instead of a log line thousands of ``\\r``-joined characters long."""

    def __init__(self, name: str, total: int, initial: int, enabled: bool, unit: str = "step"):
        from tqdm import tqdm

        self.total, self.enabled, self.tty, self.unit = total, enabled, sys.stderr.isatty(), unit
        self.start, self.mark = time.perf_counter(), (initial, time.perf_counter())
        self.bar = tqdm(
            total=total,
            initial=initial,
            desc=name,
            unit=unit,
            unit_scale=unit != "step",
            dynamic_ncols=True,
            disable=not (enabled and self.tty),
        )

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def report(self, step: int, shown: dict[str, str]) -> None:
        now = time.perf_counter()
        rate = (step - self.mark[0]) / max(now - self.mark[1], 1e-9)
        self.mark = (step, now)
        self.bar.set_postfix(shown)
        if self.enabled and not self.tty:
            eta = duration((self.total - step) / rate) if rate > 0 else "?"
            logging.getLogger(__name__).info(
                "%s %d/%d | %.3g %ss/s | ETA %s | %s",
                self.unit,
                step,
                self.total,
                rate,
                self.unit,
                eta,
                " ".join(f"{k} {v}" for k, v in shown.items()),
            )

    def elapsed(self) -> str:
        return duration(time.perf_counter() - self.start)

    def close(self) -> None:
        self.bar.close()
