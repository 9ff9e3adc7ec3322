"""Two real ranks under the `deepspeed` launcher (CPU, gloo): a frozen rank ends the run
within the hang bound with the frozen rank named, and a slowed rank is named the
straggler in metrics.jsonl."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time

import psutil
import pytest

from pixelbert_dist.distributed.watchdog import HANG_EXIT_CODE
from tests.pretrain_helpers import REPO, deepspeed_cmd, fast_overrides, launch_env, run_launcher, train_losses


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    for process in psutil.Process(launcher.pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if f"--local_rank={rank}" in process.cmdline():
                return process.pid
    raise AssertionError(f"no rank {rank} under the launcher")


@pytest.mark.launcher
@pytest.mark.slow
def test_a_frozen_rank_ends_the_run_with_the_hung_rank_named(shards, tmp_path):
    """Rank 1 is SIGSTOPped after 3 steps: rank 0's watchdog fires after hang_timeout_s,
    names rank 1 as the silent one, dumps its stacks and exits with the hang code; the
    launcher ends the run with that code instead of waiting for the 10-minute timeout."""
    run_dir = tmp_path / "run"
    args = fast_overrides(run_dir, shards, steps=400, val=False) + ["train.hang_timeout_s=20", "train.export=false"]
    launcher = subprocess.Popen(
        deepspeed_cmd("launch/pretrain.py", ["--deepspeed_config", "deepspeed_configs/zero2.json", *args]),
        cwd=REPO,
        env=launch_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    frozen = None
    try:
        deadline = time.monotonic() + 400
        while not ((run_dir / "metrics.jsonl").exists() and len(train_losses(run_dir)) >= 3):
            assert launcher.poll() is None and time.monotonic() < deadline, "the run did not reach step 3"
            time.sleep(0.5)
        frozen = _rank_pid(launcher, 1)
        os.kill(frozen, signal.SIGSTOP)
        output = launcher.communicate(timeout=300)[0]
    finally:
        if frozen is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(frozen, signal.SIGKILL)
        launcher.kill()
    assert launcher.returncode == HANG_EXIT_CODE, output[-3000:]
    assert "[watchdog] rank 0 of 2 on host" in output, output[-3000:]
    assert "no progress for" in output and "in training (after step" in output
    assert "rank 1 (host" in output and "silent for" in output, output[-3000:]
    assert "resumes from its latest checkpoint" in output
    assert "Thread 0x" in output or "Current thread 0x" in output  # faulthandler's stacks


@pytest.mark.launcher
@pytest.mark.slow
def test_a_slowed_rank_is_named_the_straggler(shards, tmp_path):
    """Rank 1's loader is 0.3 s late on every batch: each train row names rank 1 as the
    slowest in data wait, with its host, and the median sits between the two ranks."""
    run_launcher("tests/dist/straggler.py", [str(tmp_path), str(shards["train"])])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in rows] == [2, 4, 6]
    for row in rows:
        assert row["data_wait_s_slowest_rank"] == 1, row
        assert row["data_wait_s_max"] >= 0.3 * 0.95, row  # one micro-batch per step, each 0.3 s late
        assert row["data_wait_s_min"] < 0.3 * 0.5, row
        assert row["data_wait_s_slowest_host"], row
        assert row["step_s_min"] <= row["step_s_median"] <= row["step_s_max"], row
