"""Shared by the benchmarks: where results go, what machine made them, timing, tables, JSON.

Every benchmark writes ``{"bench": NAME, "machine": {...}, "config": {...}, "rows": [...]}``
(the shape bench_data.py writes too), so summarize.py can read them all alike. Results go to
a new folder per run, ``benchmarks/results/<machine>-<YYYY-MM-DD>-<suite>[-N]/`` (the
scheme of every folder there, see results/README.md), unless ``--out`` or
$BENCH_RESULTS_DIR says otherwise: two suite runs never share a folder.

Timings that compare two things are taken interleaved (A B A B ...), so a neighbour's load
on a shared machine hits both alike; each figure is a median with its spread.

Peak TFLOP/s per GPU model: the table lives in ``pixelbert_dist.metrics`` (the trainer's
MFU meter uses it too) and the benchmarks import it from there, so a benchmark and a
training log compute MFU against the same number.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import os
import platform
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

if TYPE_CHECKING:  # torch is imported where it is used: a benchmark's --help stays instant
    import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def machine_name() -> str:
    """``h100-80gb-hbm3-x1`` on a GPU box, ``cpu-2core`` elsewhere (folder-safe)."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0).lower().replace("nvidia", "")
        slug = re.sub(r"[^a-z0-9]+", "-", name).strip("-")
        return f"{slug}-x{torch.cuda.device_count()}"
    return f"cpu-{os.cpu_count()}core"


def new_run_dir(suite: str, root: Path = RESULTS) -> Path:
    """A fresh folder for one suite run: <machine>-<YYYY-MM-DD>-<suite>, -2, -3 ... on the
    same day (the results/ naming scheme)."""
    stamp = _dt.date.today().isoformat()
    base = root / f"{machine_name()}-{stamp}-{re.sub(r'[^a-z0-9]+', '-', suite.lower()).strip('-')}"
    root.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
        path = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            path.mkdir()  # atomic: of two runs starting together, one gets -2
            return path
        except FileExistsError:
            continue


def results_dir(out: str | Path | None = None) -> Path:
    """``out`` if given, else $BENCH_RESULTS_DIR, else a new folder for this run (new_run_dir)."""
    if out or os.environ.get("BENCH_RESULTS_DIR"):
        path = Path(out or os.environ["BENCH_RESULTS_DIR"])
        path.mkdir(parents=True, exist_ok=True)
        return path
    path = new_run_dir("single")
    os.environ["BENCH_RESULTS_DIR"] = str(path)  # later writes of this process go beside it
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
    import torch

    from pixelbert_dist.metrics import git_commit

    info = {
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": None,
        "gpu_count": 0,
        "commit": git_commit(ROOT),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_count=torch.cuda.device_count(),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cudnn=torch.backends.cudnn.version(),
        )
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except Exception:  # noqa: BLE001 - optional here (the attention bench needs none)
        info["deepspeed"] = None
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        import torch

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


def interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Seconds per call of each of ``fns``, called round-robin ``repeats`` times after
    ``warmup`` rounds, so drifting load on a shared machine hits every variant alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def spread(values: Iterable[float]) -> dict:
    """Median, min, max and the relative half-range of repeated measurements."""
    values = sorted(values)
    mid = median(values)
    return {
        "median": mid,
        "min": values[0],
        "max": values[-1],
        "n": len(values),
        "spread": (values[-1] - values[0]) / 2 / mid if mid else None,
    }


def verdict(value: float | None, target: float, higher_is_better: bool = True) -> str:
    """ "met" / "not met" against a target (or "-" without a figure)."""
    if value is None:
        return "-"
    return "met" if (value >= target if higher_is_better else value <= target) else "not met"


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


def write_results(
    name: str,
    rows: list[dict],
    config: dict,
    out: str | Path | None,
    columns: list[str],
    shown: list[dict] | None = None,
    partial: bool = False,
) -> Path:
    """Print the table (``shown`` rows, default all) and write ``<dir>/<name>.json``.

    ``config`` should say what the figures compare against (``baseline``) and the target
    (``target``): summarize.py prints both above the table. ``partial``: the rows so far,
    written quietly after each one finishes, so a run stopped by its time limit (the GPU
    check's steps have one) keeps what it measured; the last call writes them all."""
    if not partial:
        print(markdown_table(rows if shown is None else shown, columns), flush=True)
    path = results_dir(out) / f"{name}.json"
    payload = {"bench": name, "machine": machine_info(), "config": config, "columns": columns, "rows": rows}
    if partial:
        payload["partial"] = True
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(path)  # never a half-written file if the process is killed mid-write
    if not partial:
        print(f"wrote {path}", flush=True)
    return path
