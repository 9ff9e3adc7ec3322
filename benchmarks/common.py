"""Shared by the benchmarks: where results go, what machine made them, timing, tables, JSON.

Every benchmark writes ``{"bench": NAME, "machine": {...}, "config": {...}, "rows": [...]}``
(the shape bench_data.py writes too), so summarize.py can read them all alike. Results go to
``benchmarks/results/<machine>-<date>/`` unless ``--out`` says otherwise.

Peak TFLOP/s per GPU model: the table lives in ``pixelbert_dist.metrics`` (the trainer's
MFU meter uses it too) and is re-exported here, so a benchmark and a training log
compute MFU against the same number.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pixelbert_dist.metrics import PEAK_TFLOPS, git_commit, peak_tflops  # noqa: E402,F401

RESULTS = ROOT / "benchmarks" / "results"


def machine_name() -> str:
    """``h100-80gb-hbm3-x1`` on a GPU box, ``cpu-2core`` elsewhere (folder-safe)."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0).lower().replace("nvidia", "")
        slug = re.sub(r"[^a-z0-9]+", "-", name).strip("-")
        return f"{slug}-x{torch.cuda.device_count()}"
    return f"cpu-{os.cpu_count()}core"


def results_dir(out: str | Path | None = None) -> Path:
    """``out`` if given, else $BENCH_RESULTS_DIR, else results/<machine>-<date>/."""
    path = Path(out or os.environ.get("BENCH_RESULTS_DIR") or
                RESULTS / f"{machine_name()}-{_dt.date.today().isoformat()}")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """Hardware, software versions and commit: what a number needs to be comparable."""
    info = {"host": platform.node(), "cpu": _cpu_model(), "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "gpu": None, "gpu_count": 0, "commit": git_commit(ROOT),
            "date": _dt.datetime.now().isoformat(timespec="seconds")}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(),
                    gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cudnn=torch.backends.cudnn.version())
    try:
        import deepspeed
        info["deepspeed"] = deepspeed.__version__
    except Exception:  # noqa: BLE001 - optional here (the attention bench needs none)
        info["deepspeed"] = None
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Seconds of each of ``iters`` calls after ``warmup`` untimed ones (synchronised)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def median(values: Iterable[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def write_results(name: str, rows: list[dict], config: dict, out: str | Path | None,
                  columns: list[str]) -> Path:
    """Print the table and write ``<dir>/<name>.json``; returns the JSON path."""
    print(markdown_table(rows, columns), flush=True)
    path = results_dir(out) / f"{name}.json"
    payload = {"bench": name, "machine": machine_info(), "config": config, "columns": columns,
               "rows": rows}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {path}", flush=True)
    return path
