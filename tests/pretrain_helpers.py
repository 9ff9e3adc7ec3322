"""Shared by the pre-training tests: tiny shards, fast overrides, launching real ranks."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def fast_overrides(run_dir, shards: dict, steps: int = 8, val: bool = True) -> list[str]:
    """A tiny, fp32, CPU-fast run over the test shards."""
    return [
        f"run_dir={run_dir}",
        f"data.train_shards={shards['train']}",
        f"data.val_shards={shards['val'] if val else 'null'}",
        "data.backend=pil",
        "data.num_workers=0",
        "data.image_shorter=64",
        "data.image_max=128",
        "data.max_text_len=24",
        "model.overrides.pixel_sample_size=4",
        "train.micro_batch=4",
        "train.precision=fp32",
        f"train.max_steps={steps}",
        "train.log_every=1",
        "train.save_every=4",
        "train.eval_every=0",
        "train.retrieval_size=8",
        "schedule.warmup_steps=2",
    ]


LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launch_env() -> dict:
    """This environment for a command the test starts, without the rendezvous this test
    process made for itself (its MASTER_PORT is taken: a single-process command would
    try to listen on it)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    return env


def deepspeed_cmd(script: str, args: list[str], num_ranks: int = 2, module: bool = False) -> list[str]:
    """The real `deepspeed` launcher of this environment, `num_ranks` CPU ranks over gloo;
    ``module``: ``script`` is a module name, run as `python -m` (the benchmarks)."""
    from pixelbert_dist.distributed.env import free_port

    launcher = str(Path(sys.executable).parent / "deepspeed")
    target = ["--module", script] if module else [script]
    return [launcher, "--num_gpus", str(num_ranks), "--master_port", str(free_port()), *target, *args]


def run_launcher(
    script: str, args: list[str], timeout: int = 400, module: bool = False, num_ranks: int = 2
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        deepspeed_cmd(script, args, num_ranks, module=module),
        cwd=REPO,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"launcher failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def sigterm_launcher(script: str, args: list[str], run_dir, after_steps: int, timeout: int = 300) -> str:
    """Launch ``script`` on 2 ranks, SIGTERM every process of each rank (its data-loader
    workers too, as Slurm signals a job step) once ``after_steps`` train rows are logged;
    the launcher's output, after it exited 0."""
    import psutil

    launcher = subprocess.Popen(
        deepspeed_cmd(script, args), cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    metrics, deadline = Path(run_dir) / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline and len(train_losses(run_dir) if metrics.exists() else {}) < after_steps:
        time.sleep(0.2)
    name = Path(script).name
    for process in psutil.Process(launcher.pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):  # a loader worker between epochs may be gone
            command = process.cmdline()
            if any(name in part for part in command) and not any("deepspeed.launcher" in part for part in command):
                process.send_signal(signal.SIGTERM)
    output = launcher.communicate(timeout=timeout)[0].decode()
    assert launcher.returncode == 0, output[-3000:]
    return output


def train_losses(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def poison_images(trainer, bad) -> None:
    """NaN images for the micro-batches whose number (from 0) satisfies ``bad``: a corrupt
    decode, say. Wraps the trainer's own ``to_device``."""
    import torch

    to_device, calls = trainer.to_device, []

    def wrapped(batch):
        out = to_device(batch)
        calls.append(len(calls))
        if bad(calls[-1]):
            out["images"] = torch.full_like(out["images"], float("nan"))
        return out

    trainer.to_device = wrapped


def signal_at(run, micro_batch: int, sig=signal.SIGTERM) -> None:
    """Deliver ``sig`` to this process and its data-loader workers (as Slurm signals every
    process of a job step) while micro-batch ``micro_batch`` (from 0) is moved to the device."""
    import psutil

    to_device, calls = run.to_device, []

    def wrapped(batch):
        calls.append(None)
        if len(calls) == micro_batch + 1:
            me, pids = psutil.Process(), [str(os.getpid())]
            for worker in me.children():  # forked workers run this process's command line
                with contextlib.suppress(psutil.NoSuchProcess):
                    if worker.cmdline() == me.cmdline():
                        pids.append(str(worker.pid))
            # from another process: torch's workers take a SIGTERM from their parent as "exit"
            subprocess.run(["kill", "-s", signal.Signals(sig).name[3:], *pids], check=True)
        return to_device(batch)

    run.to_device = wrapped


def record_keys(run) -> list[list[str]]:
    """The sample keys of every micro-batch the trainer moves to the device, in order."""
    to_device, keys = run.to_device, []

    def wrapped(batch):
        keys.append(list(batch["keys"]))
        return to_device(batch)

    run.to_device = wrapped
    return keys
