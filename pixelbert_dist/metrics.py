"""Run logging (JSONL, TensorBoard, W&B; rank 0 only), metric sums kept on the device until
log time, and the throughput / MFU meter."""

from __future__ import annotations

import json
import logging
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pixelbert_dist.collectives import collective_device
from pixelbert_dist.tracking import open_writers

log = logging.getLogger(__name__)

# Dense peak TFLOP/s per GPU by precision (vendor data sheets, no sparsity).
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},  # SXM; PCIe is lower, see below
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
        out = subprocess.run(
            ["git", "-C", str(repo), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=30
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is KiB on Linux, bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


class MetricSums:
    """Sums of per-micro-batch metrics that stay where they were computed until ``reduce``:
    tensors add up on their device (no host sync in the hot loop), plain numbers (counts the
    host already knows, such as a batch's size) on the host."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self.numbers: dict[str, float] = {}

    def add(self, values: dict) -> None:
        for key, value in values.items():
            if torch.is_tensor(value):
                value = value.detach().double()
                self.tensors[key] = value + self.tensors[key] if key in self.tensors else value
            else:
                self.numbers[key] = self.numbers.get(key, 0) + value

    def merge(self, other: "MetricSums") -> None:
        self.add(other.tensors)
        self.add(other.numbers)

    def clear(self) -> None:
        self.tensors, self.numbers = {}, {}

    def __bool__(self) -> bool:
        return bool(self.tensors or self.numbers)

    def reduce(self) -> dict[str, float]:
        """Every rank's sums added up: one all-reduce and one device-to-host copy in all
        (every rank must hold the same keys)."""
        if not self:
            return {}
        keys, numbers = sorted(self.tensors), sorted(self.numbers)
        distributed = dist.is_initialized() and dist.get_world_size() > 1
        device = collective_device() if distributed else next(iter(self.tensors.values()), torch.zeros(())).device
        parts = [torch.stack([self.tensors[k].reshape(()) for k in keys]).to(device)] if keys else []
        parts.append(torch.tensor([float(self.numbers[k]) for k in numbers], dtype=torch.float64, device=device))
        flat = torch.cat(parts)
        if distributed:
            dist.all_reduce(flat)
        return dict(zip(keys + numbers, flat.tolist()))


class ThroughputMeter:
    """Samples/s, TFLOP/s per GPU and MFU over a logging window, and how much of the
    window the step waited for data rather than computed. FLOPs are charged per batch (at
    its own padded size), so bucketed image sizes count what really ran."""

    def __init__(self, peak: float | None, world_size: int):
        self.peak, self.world_size = peak, world_size
        self.reset()

    def reset(self) -> None:
        self.samples, self.flops, self.data_time, self.compute_time = 0, 0.0, 0.0, 0.0
        self.start = time.perf_counter()

    def add(self, samples: int, data_time: float, compute_time: float, flops: float = 0.0) -> None:
        self.samples += samples
        self.flops += flops
        self.data_time += data_time
        self.compute_time += compute_time

    def summary(self) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        per_gpu = self.samples / elapsed  # this rank's samples: ranks run in lock-step
        tflops = self.flops / elapsed / 1e12
        out = {
            "samples_per_s": per_gpu * self.world_size,
            "tflops_per_gpu": tflops,
            "data_wait_frac": self.data_time / max(self.data_time + self.compute_time, 1e-9),
        }
        if self.peak:
            out["mfu"] = tflops / self.peak
        return out


class RunLogger:
    """One JSON object per line in ``metrics.jsonl``, and the same rows to the writers of
    ``report_to`` (TensorBoard, W&B: ``pixelbert_dist.tracking``); a no-op on ranks other
    than 0, so callers need no ``if rank == 0``. A run resumed at step T hides TensorBoard's
    events of the steps after T that the interrupted run had logged (``purge_step``), as
    ``metrics.superseded.jsonl`` sets their rows apart."""

    def __init__(
        self,
        run_dir: str | Path,
        enabled: bool,
        resumed_step: int = 0,
        report_to: list[str] = ("tensorboard",),
        wandb_project: str = "pixelbert_dist",
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.evaluations: list[tuple[int, str, dict]] = []  # every non-train row, for the summary
        self.writers = []
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writers = open_writers(Path(run_dir), list(report_to), resumed_step, wandb_project)

    def log(self, step: int, split: str, values: dict, labels: dict[str, str] | None = None) -> None:
        """``values`` to metrics.jsonl and every writer; ``labels`` (text, e.g. a host name)
        to metrics.jsonl and the writers that keep text (W&B), not TensorBoard's scalars."""
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "split": split, "time": time.time(), **clean, **(labels or {})}) + "\n")
        for writer in self.writers:
            writer.log(step, split, clean, labels or {})
        if split != "train":
            self.evaluations.append((step, split, clean))
            log.info("%s at step %d: %s", split, step, format_values(clean))

    def log_config(self, config: dict) -> None:
        """The resolved config to every writer (TensorBoard: YAML text and hparams)."""
        for writer in self.writers:
            writer.log_config(config)

    def best(self) -> dict[str, tuple[float, int]]:
        """Per ``split/metric``: the best value over the evaluations and its step (losses
        lowest, everything else highest)."""
        out: dict = {}
        for step, split, values in self.evaluations:
            for key, value in values.items():
                name, lower = f"{split}/{key}", "loss" in key
                if name not in out or (value < out[name][0] if lower else value > out[name][0]):
                    out[name] = (value, step)
        return out

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers = []


def format_values(values: dict, digits: int = 4) -> str:
    return ", ".join(f"{k}={v:.{digits}g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: point at a run folder's metrics.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
