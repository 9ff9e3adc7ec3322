"""A run's health at scale, for ``BaseTrainer``: hangs end within a bound, stragglers show.

* The hang watchdog (``distributed/watchdog.py``) hears of every optimizer step; start-up
  to the first step, saves and evaluations are slow phases with their own bound.
* The collectives' timeout is long until the first step (DeepSpeed's first collectives,
  a resume's reads) and during slow phases, short while training: a frozen or dead peer
  ends a waiting rank with an error within ``train.collective_timeout_s``.
* Stragglers: at each log step every rank's step time and data wait (host seconds per
  optimizer step over the log period) are gathered in one small all-gather (log time
  only, nothing added to the step) and logged as min / median / max with the slowest
  rank and its host; a warning when the slowest rank is >= ``STRAGGLER_RATIO`` x the
  median for ``STRAGGLER_STREAK`` log steps in a row.
"""

from __future__ import annotations

import contextlib
import logging
import socket

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from pixelbert_dist.collectives import collective_device, gather_objects
from pixelbert_dist.distributed.env import set_collective_timeout
from pixelbert_dist.distributed.watchdog import Heartbeats, HangWatchdog

log = logging.getLogger("pixelbert_dist.train.loop")
STRAGGLER_RATIO = 1.5
STRAGGLER_STREAK = 3  # log steps in a row before the warning
STRAGGLER_FLOOR_S = 0.005  # differences below this are timer noise, not a straggler
TIMED = ("step_s", "data_wait_s")  # per rank, per optimizer step


class RunHealth:
    """Owned by the trainer: ``with health:`` around ``fit``; ``step_done(step)`` after
    each optimizer step; ``with health.slow_phase(what):`` around saves and evaluations;
    ``straggler_values(...)`` at log time (every rank)."""

    def __init__(self, loop_cfg, rank: int, world: int):
        self.cfg, self.rank, self.world = loop_cfg, rank, world
        beats = None
        if world > 1 and loop_cfg.hang_timeout_s > 0:  # every rank's first beat is in before the gather
            beats = Heartbeats(c10d._get_default_store(), rank, world, min(5.0, loop_cfg.hang_timeout_s / 6))
        self.hosts = gather_objects(socket.gethostname())  # once: names the slowest (or a hung) rank's host
        if beats is not None:
            beats.hosts = self.hosts
        self.watchdog = HangWatchdog(
            loop_cfg.hang_timeout_s, rank, world, first_phase_s=loop_cfg.slow_phase_timeout_s, heartbeats=beats
        )
        self._training_timeout_set = False
        self.streak = 0

    def __enter__(self) -> "RunHealth":
        if self.watchdog.heartbeats is not None:
            self.watchdog.heartbeats.start()
        self.watchdog.start()
        return self

    def __exit__(self, *exc) -> None:
        self.watchdog.stop()

    def step_done(self, step: int) -> None:
        """After every optimizer step: the watchdog's timer restarts; after the first, the
        collectives get their training timeout."""
        self.watchdog.progress(step)
        if not self._training_timeout_set:
            self._training_timeout_set = True
            set_collective_timeout(self.cfg.collective_timeout_s)

    @contextlib.contextmanager
    def slow_phase(self, what: str, step: int):
        """A save or an evaluation: its own bound for the watchdog and the collectives (rank
        0 writing while the others wait at a barrier is not a hang)."""
        self.watchdog.phase(f"{what} at step {step}", self.cfg.slow_phase_timeout_s)
        set_collective_timeout(self.cfg.slow_phase_timeout_s)
        try:
            yield
        finally:
            if self._training_timeout_set:
                set_collective_timeout(self.cfg.collective_timeout_s)
            self.watchdog.progress(step)

    # -- stragglers -------------------------------------------------------------------
    def straggler_values(self, step_s: float, data_wait_s: float) -> tuple[dict[str, float], dict[str, str]]:
        """Every rank's seconds per step, gathered (a collective: every rank calls it at
        the same log step): numbers for metrics.jsonl / TensorBoard, and the slowest
        ranks' hosts (labels for metrics.jsonl)."""
        mine = torch.tensor([step_s, data_wait_s], dtype=torch.float64, device=collective_device())
        if self.world > 1:
            every = torch.empty(self.world * len(TIMED), dtype=torch.float64, device=mine.device)
            dist.all_gather_into_tensor(every, mine)
            every = every.reshape(self.world, len(TIMED))
        else:
            every = mine.reshape(1, -1)
        every, values, labels = every.cpu(), {}, {}  # one copy to the host, at log time
        for column, name in enumerate(TIMED):
            per_rank = every[:, column]
            slowest = int(per_rank.argmax())
            values.update(
                {
                    f"{name}_min": float(per_rank.min()),
                    f"{name}_median": float(per_rank.median()),
                    f"{name}_max": float(per_rank.max()),
                    f"{name}_slowest_rank": float(slowest),
                }
            )
            labels[f"{name}_slowest_host"] = self.hosts[slowest]
        self._watch_streak(values, labels)
        return values, labels

    def _watch_streak(self, values: dict, labels: dict) -> None:
        """One warning when one measure's slowest rank stays >= ratio x its median for
        ``STRAGGLER_STREAK`` log steps in a row (rank 0 logs it)."""
        lagging = [
            name
            for name in TIMED
            if values[f"{name}_max"] >= STRAGGLER_RATIO * values[f"{name}_median"]
            and values[f"{name}_max"] - values[f"{name}_median"] > STRAGGLER_FLOOR_S
        ]
        self.streak = self.streak + 1 if lagging else 0
        if self.streak == STRAGGLER_STREAK and self.rank == 0:
            name = lagging[0]
            log.warning(
                "straggler: rank %d (host %s) took %.3g s per step in %s, %.1fx the median %.3g s, for %d log "
                "steps in a row (slow data reading or a slow device on that node; see %s_* in metrics.jsonl)",
                int(values[f"{name}_slowest_rank"]),
                labels[f"{name}_slowest_host"],
                values[f"{name}_max"],
                name.removesuffix("_s"),
                values[f"{name}_max"] / max(values[f"{name}_median"], 1e-12),
                values[f"{name}_median"],
                self.streak,
                name,
            )
