"""What every task of a submitted job runs.

Each task exports the rank environment and runs the trainer (``pixelbert_dist.train.run``)
in a child process, for one reason: on a time limit or a preemption submitit calls
``checkpoint()`` from a signal handler on rank 0, and a DeepSpeed checkpoint is a
collective that cannot run inside a handler. So ``checkpoint()`` sends SIGUSR1 to the
trainer (every rank stops at the same step, since the trainer all-reduces the flag),
waits until it has saved and exited, and hands submitit a copy of itself to requeue;
the requeued job resumes from the latest checkpoint (``train.resume=auto``). A job
whose trainer made no progress since its attempt started (no new checkpoint: stuck
before step 1, e.g. in the rendezvous) is not requeued: another attempt would spend
the same time the same way. A trainer that dies after progress (a hang exit, a
crashed rank, a collective's timeout) requeues the job too, up to ``max_restarts``
times per submission (``restart.py``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import submitit

from pixelbert_dist.checkpoint.layout import read_latest
from pixelbert_dist.distributed.env import RENDEZVOUS_SOURCE_VAR, RENDEZVOUS_TIMEOUT_VAR, job_port, slurm_master
from pixelbert_dist.jobs import restart

RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
ENTRY = "pixelbert_dist.train.run"
TRAINER_MODULE = "pixelbert_dist.jobs.trainer_process"  # the child: see that module


def _master_address(dist, environ: dict) -> tuple[str, str]:
    """MASTER_ADDR and a sentence on how it and MASTER_PORT were chosen."""
    port_how = (
        "MASTER_PORT exported where the job was submitted"
        if environ.get("MASTER_PORT")
        else "MASTER_PORT derived from the job id"
    )
    if environ.get("SUBMITIT_EXECUTOR") == "slurm":
        addr, addr_how = slurm_master(environ)
    else:
        addr, addr_how = dist.master_addr, "this machine (local executor)"
    return addr, f"MASTER_ADDR={addr}: {addr_how}; {port_how}"


def _visible_gpus(environ: dict, local_rank: int, local_tasks: int) -> str | None:
    """Slurm gives every task of a node all its GPUs: this task's share of them."""
    visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    if len(visible) <= 1 or len(visible) % max(1, local_tasks):
        return None
    share = len(visible) // local_tasks
    return ",".join(visible[local_rank * share : (local_rank + 1) * share])


def _task_environment(cpus_per_task: int, code_dir: str, rendezvous_timeout_s: int | None = None) -> dict[str, str]:
    """The trainer's environment: rank variables, CUDA devices, NCCL/OMP defaults."""
    dist = submitit.helpers.TorchDistributedEnvironment()
    env = dict(os.environ)
    addr, source = _master_address(dist, env)
    # not submitit's port (20000-60000, mostly where the OS picks ports for connections)
    job_id = env.get("SLURM_JOB_ID") or env.get("SUBMITIT_LOCAL_JOB_ID") or "0"
    env.update(
        MASTER_ADDR=addr,
        MASTER_PORT=env.get("MASTER_PORT") or str(job_port(job_id)),
        RANK=str(dist.rank),
        WORLD_SIZE=str(dist.world_size),
        LOCAL_RANK=str(dist.local_rank),
        LOCAL_WORLD_SIZE=str(dist.local_world_size),
    )
    env[RENDEZVOUS_SOURCE_VAR] = source
    if rendezvous_timeout_s:
        env[RENDEZVOUS_TIMEOUT_VAR] = str(rendezvous_timeout_s)
    gpus = _visible_gpus(env, dist.local_rank, dist.local_world_size)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    defaults = {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # a dead peer raises instead of hanging
        "NCCL_DEBUG": "WARN",
        "OMP_NUM_THREADS": str(cpus_per_task),
        "PYTHONUNBUFFERED": "1",
    }
    for key, value in defaults.items():
        env.setdefault(key, value)  # what the user exported wins
    env["PYTHONPATH"] = os.pathsep.join([code_dir] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


class PretrainTask(submitit.helpers.Checkpointable):
    """One task of a (multi-node) pre-training job; requeued by submitit on a time-out."""

    def __init__(
        self,
        argv: list[str],
        code_dir: str,
        workdir: str,
        cpus_per_task: int = 8,
        stop_timeout_s: int = 600,
        entry: str = ENTRY,
        run_dir: str | None = None,
        rendezvous_timeout_s: int | None = None,
        max_restarts: int = 3,
    ):
        self.argv, self.code_dir, self.workdir = list(argv), code_dir, workdir
        self.cpus_per_task, self.stop_timeout_s, self.entry = cpus_per_task, stop_timeout_s, entry
        self.run_dir, self.rendezvous_timeout_s = run_dir, rendezvous_timeout_s
        self.max_restarts = max_restarts
        self.attempt = 0
        self.restarts = 0  # requeues after a failure, in this submission
        self._child: subprocess.Popen | None = None
        self._sigterm = False
        self._start_tag: str | None = None

    def __getstate__(self) -> dict:  # a process handle does not travel to the requeued job
        return {**self.__dict__, "_child": None, "_sigterm": False}

    def command(self) -> list[str]:
        # -P: the working directory (the user's checkout) must not shadow the snapshot
        return [sys.executable, "-P", "-m", TRAINER_MODULE, self.entry, *self.argv]

    def _latest(self) -> str | None:
        return read_latest(Path(self.run_dir) / "checkpoints") if self.run_dir else None

    def __call__(self) -> int:
        env = _task_environment(self.cpus_per_task, self.code_dir, self.rendezvous_timeout_s)
        print(
            f"[submit] attempt {self.attempt} rank {env['RANK']}/{env['WORLD_SIZE']} "
            f"master {env['MASTER_ADDR']}:{env['MASTER_PORT']} code {self.code_dir}",
            flush=True,
        )
        self._start_tag = self._latest()
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            self._child = subprocess.Popen(self.command(), cwd=self.workdir, env=env)
            # poll, never a blocking wait(): Popen.wait() holds a lock that checkpoint(),
            # running in a signal handler on this thread, would then wait on forever
            while (rc := self._child.poll()) is None:
                time.sleep(0.5)
        finally:
            signal.signal(signal.SIGTERM, previous)
        if rc != 0:
            self._after_failure(rc, env["RANK"])
        if self._sigterm:  # preempted: the trainer saved on SIGTERM; wait for USR2 to requeue
            time.sleep(min(self.stop_timeout_s, 180))
        return rc

    def _after_failure(self, rc: int, rank: str) -> None:
        """Requeue the job when the run progressed and restarts are left (then exit this
        task), else fail it with the reason."""
        cause, latest = restart.exit_cause(rc), self._latest()
        on_slurm = os.environ.get("SUBMITIT_EXECUTOR") == "slurm"
        progressed = bool(self.run_dir) and latest != self._start_tag
        reason = restart.no_restart_reason(rc, progressed, self.restarts, self.max_restarts, on_slurm)
        where = f"attempt {self.attempt}, rank {rank} on {socket.gethostname()}"
        if reason is None:
            job = submitit.JobEnvironment()
            if restart.claim_restart(job.paths.folder, job.job_id, self.attempt):
                restart.log_restart(
                    self.run_dir,
                    f"[submit] restart {self.restarts + 1}/{self.max_restarts} of job {job.job_id}: the trainer "
                    f"{cause} ({where}); requeued, resuming from checkpoint {latest}",
                )
                successor = self._successor()
                successor.restarts = self.restarts + 1
                restart.requeue(successor)
            sys.exit(0)  # the requeue ends this attempt's tasks; nothing more to do here
        raise RuntimeError(f"the trainer {cause} ({where}): not requeued, {reason}")

    def _successor(self) -> "PretrainTask":
        """This task for the next attempt: resumes from the latest checkpoint."""
        # whatever the first attempt resumed from, a requeued one goes on from the latest
        argv = self.argv if self.argv[-1:] == ["train.resume=auto"] else self.argv + ["train.resume=auto"]
        fresh = PretrainTask(
            argv,
            self.code_dir,
            self.workdir,
            self.cpus_per_task,
            self.stop_timeout_s,
            self.entry,
            self.run_dir,
            self.rendezvous_timeout_s,
            self.max_restarts,
        )
        fresh.attempt, fresh.restarts = self.attempt + 1, self.restarts
        return fresh

    def _on_sigterm(self, signum, frame) -> None:
        # Slurm's preemption SIGTERM reaches the trainer itself; only remember it here
        self._sigterm = True

    def _stop_child(self) -> None:
        child = self._child
        if child is None or child.poll() is not None:
            return
        print(f"[submit] time limit or preemption: asking the trainer (pid {child.pid}) to save and stop", flush=True)
        child.send_signal(signal.SIGUSR1)
        if not _reap(child, self.stop_timeout_s):
            print(
                f"[submit] the trainer did not stop within {self.stop_timeout_s}s: killed; "
                f"a requeued job resumes from the previous checkpoint",
                flush=True,
            )
            child.kill()
            _reap(child, 30)

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission | None:
        """Called by submitit on rank 0 at USR2: stop the trainer (it saves), then requeue
        if this attempt got anywhere."""
        self._stop_child()
        latest = self._latest()
        if self.run_dir and latest == self._start_tag:
            print(
                f"[submit] no progress in attempt {self.attempt} (the latest checkpoint is "
                f"still {latest or 'none'}): not requeued, the job ends here",
                flush=True,
            )
            return None
        return submitit.helpers.DelayedSubmission(self._successor(), *args, **kwargs)


def _reap(child: subprocess.Popen, timeout_s: float) -> bool:
    """Wait for ``child`` with waitpid itself (no Popen lock: see __call__)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            pid, status = os.waitpid(child.pid, os.WNOHANG)
        except ChildProcessError:  # reaped already
            return True
        if pid:
            child.returncode = os.waitstatus_to_exitcode(status)
            return True
        time.sleep(0.2)
    return False
