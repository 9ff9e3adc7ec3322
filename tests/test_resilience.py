"""Hangs end within a bound, failures requeue only after progress, orphaned ranks stop:
the parts, each in a real process (the 2-rank and Slurm runs are in test_resilience_dist.py
and tests/slurm/)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from pixelbert_dist.distributed.watchdog import HANG_EXIT_CODE
from pixelbert_dist.jobs.restart import REFUSED_EXIT_CODE, exit_cause, no_restart_reason
from tests.pretrain_helpers import REPO, launch_env


def _python(code: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env=launch_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_a_stalled_step_dumps_every_stack_and_exits_with_the_hang_code():
    """No progress for longer than the bound: one line naming rank, host and phase, every
    thread's stack (the stuck function is in it), and the distinct exit code."""
    proc = _python(
        """
        import time
        from pixelbert_dist.distributed.watchdog import HangWatchdog

        def stuck_in_a_collective():
            time.sleep(60)

        with HangWatchdog(1.0, rank=3, world=8) as dog:
            dog.progress(41)
            stuck_in_a_collective()
        """
    )
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == HANG_EXIT_CODE, err
    assert "rank 3 of 8 on host" in err
    assert "in training (after step 41)" in err
    assert "stuck_in_a_collective" in err  # faulthandler's stack of the main thread


def test_steps_that_keep_coming_and_a_long_slow_phase_do_not_fire():
    """Steps every 0.2 s under a 1 s bound, then a 2 s save under its 5 s bound: exit 0."""
    proc = _python(
        """
        import time
        from pixelbert_dist.distributed.watchdog import HangWatchdog

        with HangWatchdog(1.0, rank=0, world=1) as dog:
            for step in range(1, 11):
                time.sleep(0.2)
                dog.progress(step)
            dog.phase("save at step 10", 5.0)
            time.sleep(2.0)
            dog.progress(10)
        print("finished")
        """
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.strip() == "finished"


@pytest.mark.parametrize(
    "rc, progressed, restarts, on_slurm, requeued",
    [
        (HANG_EXIT_CODE, True, 0, True, True),  # a hang after progress
        (-9, True, 2, True, True),  # a SIGKILLed rank, one restart left
        (1, False, 0, True, False),  # a crash before any new checkpoint
        (REFUSED_EXIT_CODE, True, 0, True, False),  # a refused config never requeues
        (HANG_EXIT_CODE, True, 3, True, False),  # --max-restarts 3 spent
        (1, True, 0, False, False),  # not under Slurm: the user reruns
    ],
)
def test_which_failures_requeue(rc, progressed, restarts, on_slurm, requeued):
    reason = no_restart_reason(rc, progressed, restarts, 3, on_slurm)
    assert (reason is None) == requeued, reason


def test_exit_causes_are_named():
    assert "hang watchdog" in exit_cause(HANG_EXIT_CODE)
    assert exit_cause(-9) == "killed by SIGKILL"
    assert "refused" in exit_cause(REFUSED_EXIT_CODE)


@pytest.mark.slow
def test_a_rank_whose_launcher_dies_gets_the_stop_signal():
    """A launcher process starts a rank that watches it; the launcher is SIGKILLed (no
    chance to forward anything): the rank's GracefulExit sees SIGHUP and says why."""
    launcher = _python(
        """
        import subprocess, sys, textwrap, time
        rank = subprocess.Popen([sys.executable, "-c", textwrap.dedent('''
            import signal, sys, time
            from pixelbert_dist.train.signals import GracefulExit
            from pixelbert_dist.distributed.launcher_watch import watch_launcher
            watch_launcher()
            with GracefulExit() as stop:
                print("ready", flush=True)
                deadline = time.monotonic() + 30
                while not stop.requested and time.monotonic() < deadline:
                    time.sleep(0.05)
                print("stopped by", signal.Signals(stop.received).name if stop.requested else None, flush=True)
        ''')], stdout=sys.stdout)
        time.sleep(60)
        """,
    )
    rank_out = ""
    deadline = time.monotonic() + 60
    while "ready" not in rank_out and time.monotonic() < deadline:
        rank_out += os.read(launcher.stdout.fileno(), 1024).decode()
    launcher.send_signal(signal.SIGKILL)
    out, _ = launcher.communicate(timeout=60)  # the pipe closes when the rank exits too
    assert "stopped by SIGHUP" in rank_out + out


def test_the_straggler_warning_comes_after_three_log_steps_in_a_row(dist_env, caplog):
    """At one rank the gathered times are the rank's own; the warning's rule is checked on
    made-up rows: once at the third slow log step in a row, again only after a calm one."""
    from pixelbert_dist.train.config import LoopConfig
    from pixelbert_dist.train.health import RunHealth

    health = RunHealth(LoopConfig(), rank=0, world=1)
    values, labels = health.straggler_values(0.5, 0.1)
    assert values["step_s_min"] == values["step_s_median"] == values["step_s_max"] == 0.5
    assert values["data_wait_s_slowest_rank"] == 0 and labels["data_wait_s_slowest_host"] == health.hosts[0]
    slow = {"step_s_max": 1.0, "step_s_median": 1.0, "data_wait_s_max": 0.4, "data_wait_s_median": 0.1}
    calm = {**slow, "data_wait_s_max": 0.12}
    labels = {"step_s_slowest_host": "a", "data_wait_s_slowest_host": "node7"}
    with caplog.at_level("WARNING", logger="pixelbert_dist.train.loop"):
        for row in (slow, slow, calm, slow, slow, slow, slow):
            health._watch_streak({**row, "data_wait_s_slowest_rank": 5.0, "step_s_slowest_rank": 0.0}, labels)
    warnings = [r.getMessage() for r in caplog.records if "straggler" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "rank 5 (host node7)" in warnings[0] and "4.0x the median" in warnings[0]
