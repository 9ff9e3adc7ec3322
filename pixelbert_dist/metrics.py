"""Run logging (TensorBoard + JSONL, rank 0 only) and the throughput / MFU meter."""
from __future__ import annotations

import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

# Dense peak TFLOP/s per GPU by precision (vendor data sheets, no sparsity).
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},   # SXM; PCIe is lower, see below
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6},
    "A10": {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2},
    "V100": {"bf16": 0.0, "fp16": 125.0, "fp32": 15.7},
}


def peak_tflops(precision: str, device: torch.device | None = None) -> float | None:
    """The accelerator's dense peak for ``precision``; None where unknown (e.g. a CPU)."""
    if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    for model in sorted(PEAK_TFLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if all(word in name for word in model.split()):
            return PEAK_TFLOPS[model].get(precision) or None
    return None


def git_commit(repo: str | Path) -> str:
    """`git describe --always --dirty` of ``repo`` for run records; "unknown" outside a checkout."""
    try:
        out = subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is KiB on Linux, bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


class ThroughputMeter:
    """Samples/s, TFLOP/s per GPU and MFU over a logging window, and how much of the
    window the step waited for data rather than computed."""

    def __init__(self, flops_per_sample: float, peak: float | None, world_size: int):
        self.flops_per_sample, self.peak, self.world_size = flops_per_sample, peak, world_size
        self.reset()

    def reset(self) -> None:
        self.samples, self.data_time, self.compute_time = 0, 0.0, 0.0
        self.start = time.perf_counter()

    def add(self, samples: int, data_time: float, compute_time: float) -> None:
        self.samples += samples
        self.data_time += data_time
        self.compute_time += compute_time

    def summary(self) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        per_gpu = self.samples / elapsed  # this rank's samples: ranks run in lock-step
        tflops = per_gpu * self.flops_per_sample / 1e12
        out = {"samples_per_s": per_gpu * self.world_size, "tflops_per_gpu": tflops,
               "data_wait_frac": self.data_time / max(self.data_time + self.compute_time, 1e-9)}
        if self.peak:
            out["mfu"] = tflops / self.peak
        return out


class RunLogger:
    """TensorBoard scalars and one JSON object per line in ``metrics.jsonl``; a no-op
    on ranks other than 0, so callers need no ``if rank == 0``."""

    def __init__(self, run_dir: str | Path, enabled: bool):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, split: str, values: dict) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "split": split, "time": time.time(), **clean}) + "\n")
        for key, value in clean.items():
            self.tb.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: point at a run folder's metrics.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
