"""Reading the local Slurm cluster from the tests: job records, waits, logs, metrics."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from pixelbert_dist.jobs.task import TRAINER_MODULE

FINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}
CLUSTER_CONF = Path(os.environ.get("PIXELBERT_SLURM_DIR", "/tmp/pixelbert_slurm")) / "slurm.conf"
NOT_RUNNING = "no Slurm cluster: start one with tests/slurm/cluster.sh start (the slurm lane needs it)"


def cluster_reason() -> str | None:
    """None when the local cluster answers with two idle nodes, else why not."""
    if not shutil.which("sinfo") or not CLUSTER_CONF.is_file():
        return NOT_RUNNING
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %t"],
            capture_output=True,
            text=True,
            timeout=20,
            env={**os.environ, "SLURM_CONF": str(CLUSTER_CONF)},
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return NOT_RUNNING
    return None if len(re.findall(r"^node[12] ", out, re.M)) == 2 else NOT_RUNNING


def scontrol(*args: str, tries: int = 3) -> str:
    """``scontrol ARGS``; asked again when slurmctld does not answer within 30 s (a loaded
    machine: the time-limit test once failed on that alone, its job fine)."""
    for attempt in range(tries):
        try:
            return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30, check=True).stdout
        except subprocess.TimeoutExpired:
            if attempt == tries - 1:
                raise
    raise AssertionError("unreachable")


def job_records(job_id: str) -> list[dict[str, str]]:
    """``scontrol -o show job``: one dict per job (per array element)."""
    out = scontrol("-o", "show", "job", job_id)
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]


def job_record(job_id: str) -> dict[str, str]:
    (record,) = job_records(job_id)
    return record


def wait_final(job_id: str, timeout_s: float = 600, release_requeued: bool = True) -> dict:
    """Poll until the job ends. A requeued job waits ~2 min before Slurm starts it again
    (its BeginTime): the test releases it at once (StartTime=now) to keep the lane short."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = job_record(job_id)
        if record["JobState"] in FINAL:
            return record
        if release_requeued and record["JobState"] == "PENDING" and record.get("Reason") == "BeginTime":
            scontrol("update", f"jobid={job_id}", "StartTime=now")
        time.sleep(2)
    raise AssertionError(f"job {job_id} did not end within {timeout_s} s: {job_record(job_id)}")


def wait_train_steps(metrics: Path, at_least: int, job_id: str, timeout_s: float = 400, since: float = 0.0) -> None:
    """Wait for ``at_least`` train rows in ``metrics``, counted only once the file was written
    after ``since`` (a time.time()): after a requeue the old attempt's rows, up to the step
    it was killed at, stay there until the new attempt resumes and supersedes them."""

    def ready() -> bool:
        fresh = metrics.is_file() and metrics.stat().st_mtime > since
        return fresh and len(train_rows(metrics)) >= at_least

    _wait(job_id, ready, f"step {at_least} logged", timeout_s)


def wait_checkpoint_since(run_dir: Path, job_id: str, since: float, timeout_s: float = 400) -> None:
    """Until a checkpoint committed after ``since`` (a time.time()) names itself in the run
    folder's ``checkpoints/latest``: the attempt running now has saved. Polled every 0.2 s,
    so a kill that follows lands before the run's next few steps."""
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + timeout_s
    while not (latest.is_file() and latest.stat().st_mtime > since):
        assert job_record(job_id)["JobState"] not in FINAL, f"job {job_id} ended before a checkpoint after the requeue"
        assert time.monotonic() < deadline, f"job {job_id}: no checkpoint within {timeout_s} s of the requeue"
        time.sleep(0.2)


def _wait(job_id: str, ready, what: str, timeout_s: float) -> None:
    """Poll ``ready()`` each second while the job runs, at most ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        state = job_record(job_id)["JobState"]
        assert state not in FINAL, f"job {job_id} ended ({state}) before {what}"
        assert time.monotonic() < deadline, f"job {job_id}: no {what} within {timeout_s} s"
        time.sleep(1)


def train_rows(metrics: Path) -> list[dict]:
    if not metrics.is_file():
        return []
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["split"] == "train"]


def task_log(out_dir: Path, job_id: str, rank: int, kind: str = "out") -> str:
    """submitit's log of one task (``<id>_<rank>_log.out/.err``)."""
    (folder,) = [p for p in (out_dir / "submitit").iterdir() if p.name == job_id]
    return (folder / f"{job_id}_{rank}_log.{kind}").read_text(errors="replace")


def trainer_pids(job_id: str) -> list[int]:
    """The trainer processes (the submitit tasks' children) of a running job, found by
    their command line and their SLURM_JOB_ID: both "nodes" are this host."""
    tag, pids = f"SLURM_JOB_ID={job_id}".encode(), []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if TRAINER_MODULE.encode() in argv and tag in (proc / "environ").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
        except OSError:  # gone meanwhile
            continue
    return pids


@contextlib.contextmanager
def trainers_frozen(job_id: str, count: int):
    """SIGSTOP the job's trainers, SIGCONT them on leaving: a job that would otherwise end
    within seconds on a fast machine cannot finish before Slurm has acted on it (slurmctld
    tests time limits only every 30 s). Signals sent to a stopped trainer wait for it."""
    pids = trainer_pids(job_id)
    assert len(pids) == count, f"job {job_id}: expected {count} trainer processes, found {pids}"
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield pids
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def wait_log_line(out_dir: Path, job_id: str, text: str, timeout_s: float) -> None:
    """Poll rank 0's submitit log until ``text`` appears."""
    _wait(job_id, lambda: text in task_log(out_dir, job_id, 0), f"{text!r} in its log", timeout_s)


def trainer_pid(job_id: str, rank: int) -> int:
    """The trainer process of one rank of a running job (its RANK in the environment)."""
    tag = f"RANK={rank}".encode()
    for pid in trainer_pids(job_id):
        with contextlib.suppress(OSError):
            if tag in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
    raise AssertionError(f"job {job_id}: no trainer of rank {rank} among {trainer_pids(job_id)}")


def wait_requeued(job_id: str, timeout_s: float) -> float:
    """Seconds until the job is requeued (its Restarts count goes up); fails if it ends.
    A slurmctld slow to answer (a loaded machine) is asked again."""
    start, restarts = time.monotonic(), int(job_record(job_id)["Restarts"])
    while True:
        with contextlib.suppress(subprocess.TimeoutExpired):
            record = job_record(job_id)
            if int(record["Restarts"]) > restarts:
                return time.monotonic() - start
            assert record["JobState"] not in FINAL, f"job {job_id} ended ({record['JobState']}) instead of a requeue"
        assert time.monotonic() - start < timeout_s, f"job {job_id}: not requeued within {timeout_s} s"
        time.sleep(0.5)
