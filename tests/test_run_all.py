"""benchmarks/run_all.sh under a Ctrl-C: the suite stops, and the benchmark it was running
ends with it (no orphan left to run on, no next benchmark started)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.pretrain_helpers import launch_env

REPO = Path(__file__).resolve().parents[1]


def _benchmark_process(root: psutil.Process, script: str, deadline: float) -> psutil.Process:
    """The python process running ``script`` under the suite, once it has started."""
    while time.time() < deadline:
        for child in root.children(recursive=True):
            try:
                if child.name().startswith("python") and any(script in part for part in child.cmdline()):
                    return child
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.2)
    raise AssertionError(f"{script} never started")


@pytest.mark.slow
def test_ctrl_c_stops_the_suite_and_ends_its_benchmark(tmp_path):
    # a session of its own, as a terminal's foreground job: Ctrl-C goes to its process group
    proc = subprocess.Popen(
        ["bash", "benchmarks/run_all.sh", "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        env=launch_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        bench = _benchmark_process(psutil.Process(proc.pid), "benchmarks.bench_data", time.time() + 120)
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # on a failure, leave nothing running
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
    assert proc.returncode == 130, (out, err)
    assert "interrupted: stopping bench_data" in err
    assert "== bench_index" not in out  # the next benchmark never started
    gone, alive = psutil.wait_procs([bench], timeout=30)
    assert alive == [], "the benchmark outlived the suite"
