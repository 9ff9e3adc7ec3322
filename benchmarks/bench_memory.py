"""Peak memory and step time of one training step with activation checkpointing off and
on: pixelbert-r50 at 800x1333, micro-batch 2 (the issue's shape) by default.

    python -m benchmarks.bench_memory --modes none transformer all --steps 1 --warmup 1 --repeats 2  # CPU
    python -m benchmarks.bench_memory --preset tiny --image 192 256 --steps 1 --repeats 1   # smoke

Each (mode, repeat) runs in a fresh child process, in the order none, transformer, none,
transformer, ... (interleaved repeats), that builds the model and the hybrid SGD/AdamW
optimiser, creates the optimiser state with one step at 128x128 (its size does not depend
on the image), takes ``--warmup`` untimed steps and ``--steps`` measured ones (forward,
backward, optimizer step; plain PyTorch: the activations are those DeepSpeed keeps).

Memory is that of live tensors, what checkpointing changes: ``static_gib`` (weights,
buffers, optimizer state, the batch), ``activation_gib`` (allocated by the forward and
still live at its end: what it keeps for the backward), the peak of each phase and
``peak_gib`` over the step (all counting ``static_gib``). On a GPU from torch.cuda's
allocator (``max_memory_allocated``, the measure the issue's target means); on a CPU from
the CPU allocator's trace under torch.profiler (tensor_memory.AllocationTrace). The
resident-set high-water mark (``peak_rss_gib``, ``saving_vs_none``) is kept for
comparison with earlier runs; it also counts the interpreter and freed pages glibc keeps.
On a CPU the timed steps run without the profiler, and one more step is traced.

Modes: ``PixelBertConfig.activation_checkpointing``: ``none``, ``transformer`` (the encoder
layers) or ``all`` (also the CNN stem, each stage, and within a stage's recomputation each
residual block), through torch.utils.checkpoint. An export whose config still holds the old
bool maps it to ``none`` / ``transformer``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import resource
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from benchmarks.common import ROOT, spread, verdict, write_results

if TYPE_CHECKING:  # torch is imported where it is used (the children): --help answers without it
    import torch

COLUMNS = [
    "preset",
    "mode",
    "image",
    "micro_batch",
    "peak_gib",
    "backward_peak_gib",
    "optimizer_peak_gib",
    "activation_gib",
    "static_gib",
    "peak_saving_vs_none",
    "activation_saving_vs_none",
    "peak_rss_gib",
    "step_gib",
    "step_s",
    "step_s_spread",
    "saving_vs_none",
    "verdict",
]
TARGET_SAVING = 0.40
MEMORY_KEYS = (
    "peak_gib",
    "forward_peak_gib",
    "backward_peak_gib",
    "optimizer_peak_gib",
    "step_peak_gib",
    "activation_gib",
    "after_backward_gib",
    "static_gib",
)


def model_override(mode: str) -> dict:
    """The config value for ``mode`` in this tree's PixelBertConfig."""
    from pixelbert_dist.model.config import PixelBertConfig

    field = next(f for f in dataclasses.fields(PixelBertConfig) if f.name == "activation_checkpointing")
    if isinstance(field.default, bool):
        if mode == "all":
            raise SystemExit(
                "activation_checkpointing 'all' is not in this tree's model "
                "(PixelBertConfig.activation_checkpointing is a bool: transformer only)"
            )
        return {"activation_checkpointing": mode == "transformer"}
    return {"activation_checkpointing": mode}


def rss_gib() -> float:
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return kib / 2**20


def make_batch(args, device, image) -> dict:
    import torch

    from benchmarks.bench_step import synthetic_batch

    from pixelbert_dist.model import preset_config

    vocab = preset_config(args.preset).vocab_size
    batch = synthetic_batch(args.micro_batch, tuple(image), 40, vocab, 0)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def train_step(model, optimizer, batch, phase=lambda name: contextlib.nullcontext()) -> torch.Tensor:
    with phase("forward"):
        loss = model(batch)["loss"]
    with phase("backward"):
        loss.backward()
    with phase("optimizer"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def timed(step, *args) -> float:
    start = time.perf_counter()
    step(*args)
    return time.perf_counter() - start


def measured_step(model, optimizer, batch, device) -> dict:
    """One timed step; bytes (GiB) live before it (weights, optimizer state, batch), held
    for the backward at the end of the forward, live after the backward (+ gradients),
    and the peak: on a GPU torch.cuda's allocator counters, on a CPU the allocator's
    trace (tensor_memory.AllocationTrace)."""
    import torch

    from benchmarks.tensor_memory import AllocationTrace, live_bytes

    tensors = [*model.parameters(), *model.buffers(), *batch.values()]
    tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    gib = 2**-30
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        static = torch.cuda.memory_allocated(device)
        marks, phase_peaks, where = {}, {}, "(not traced on a GPU)"

        @contextlib.contextmanager
        def phase(name):
            torch.cuda.reset_peak_memory_stats(device)
            yield
            marks[name] = torch.cuda.memory_allocated(device) - static
            phase_peaks[name] = torch.cuda.max_memory_allocated(device) - static

        start = time.perf_counter()
        loss = train_step(model, optimizer, batch, phase)
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        peak = max(phase_peaks.values())
    else:
        static = live_bytes(tensors)
        with AllocationTrace() as trace:
            start = time.perf_counter()
            loss = train_step(model, optimizer, batch, trace.phase)
            seconds = time.perf_counter() - start
        marks = {name: trace.bytes_after(name) for name in ("forward", "backward")}
        phase_peaks = {name: trace.peak_bytes(name) for name in ("forward", "backward", "optimizer")}
        peak = trace.peak_bytes()
        where = trace.peak_ops()
    return {
        "static_gib": static * gib,
        "activation_gib": marks["forward"] * gib,
        "after_backward_gib": marks["backward"] * gib,
        "peak_gib": (static + peak) * gib,
        "step_peak_gib": peak * gib,
        **{f"{name}_peak_gib": (static + bytes_) * gib for name, bytes_ in phase_peaks.items()},
        "seconds": seconds,
        "loss": float(loss),
        "peak_at": where,
    }


def child(args) -> dict:
    """One mode in this process: build, create the optimizer state with a step at a small
    image (the state's size does not depend on the image), warm up, time ``--steps``, and
    measure memory (on a CPU in one more step, under the profiler)."""
    import torch

    from pixelbert_dist.model import build_model
    from pixelbert_dist.train.optim import build_optimizer
    from pixelbert_dist.train.config import OptimConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_model(args.preset, **model_override(args.mode)).to(device).train()
    optimizer = build_optimizer(model, OptimConfig())
    train_step(model, optimizer, make_batch(args, device, (128, 128)))
    batch = make_batch(args, device, args.image)
    for _ in range(args.warmup):
        train_step(model, optimizer, batch)
    before = rss_gib()
    gc.collect()
    if device.type == "cuda":  # the allocator's counters cost nothing: time the same steps
        steps = [measured_step(model, optimizer, batch, device) for _ in range(args.steps)]
        times = [step["seconds"] for step in steps]
    else:  # timed without the profiler, then one traced step for the memory
        times = [timed(train_step, model, optimizer, batch) for _ in range(args.steps)]
        steps = [measured_step(model, optimizer, batch, device)]
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    result = {key: max(step[key] for step in steps) for key in steps[0] if key not in ("seconds", "loss", "peak_at")}
    return {
        **result,
        "peak_rss_gib": peak_rss,
        "before_step_gib": before,
        "step_gib": peak_rss - before,
        "times": times,
        "loss": steps[-1]["loss"],
        "peak_at": steps[-1]["peak_at"],
        "memory": "torch.cuda allocator" if device.type == "cuda" else "CPU allocator trace (torch.profiler)",
    }


def run_child(args, mode: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_memory",
        "--child",
        "--mode",
        mode,
        "--preset",
        args.preset,
        "--micro-batch",
        str(args.micro_batch),
        "--image",
        *map(str, args.image),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        killed = " (killed by a signal: out of memory?)" if proc.returncode < 0 else ""
        raise SystemExit(f"mode {mode} failed with exit code {proc.returncode}{killed}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rows_from(args, results: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for mode, runs in results.items():
        step = spread([t for r in runs for t in r["times"]])
        rows.append(
            {
                "preset": args.preset,
                "mode": mode,
                "image": f"{args.image[0]}x{args.image[1]}",
                "micro_batch": args.micro_batch,
                **{key: min(r[key] for r in runs) for key in MEMORY_KEYS},
                "peak_rss_gib": min(r["peak_rss_gib"] for r in runs),
                "step_gib": min(r["step_gib"] for r in runs),
                "step_s": step["median"],
                "step_s_spread": step["spread"],
                "runs": runs,
            }
        )
    base = next((r for r in rows if r["mode"] == "none"), None)
    for row in rows:
        if base and row is not base:
            row["peak_saving_vs_none"] = 1 - row["peak_gib"] / base["peak_gib"]
            row["activation_saving_vs_none"] = 1 - row["activation_gib"] / base["activation_gib"]
            row["saving_vs_none"] = 1 - row["peak_rss_gib"] / base["peak_rss_gib"]
            row["step_saving_vs_none"] = 1 - row["step_gib"] / base["step_gib"]
            row["slowdown_vs_none"] = row["step_s"] / base["step_s"]
            row["verdict"] = verdict(row["peak_saving_vs_none"], TARGET_SAVING) if row["mode"] == "all" else "-"
    return rows


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="pixelbert-r50")
    parser.add_argument("--modes", nargs="+", default=["none", "transformer"], choices=["none", "transformer", "all"])
    parser.add_argument("--mode", default="none", help=argparse.SUPPRESS)  # the child's
    parser.add_argument("--image", nargs=2, type=int, default=[800, 1333], metavar=("H", "W"))
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per child")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="children per mode, interleaved")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="results folder")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict] | None:
    args = parse(argv)
    if args.child:
        print(json.dumps(child(args)))
        return None
    for mode in args.modes:
        model_override(mode)  # refuse an unknown mode before the first child
    results = {mode: [] for mode in args.modes}
    config = {k: v for k, v in vars(args).items() if k not in ("out", "child", "mode")}
    config.update(
        baseline="mode none (no activation checkpointing), same preset, image and batch",
        target=f">= {TARGET_SAVING:.0%} lower peak memory (peak_gib) with 'all'",
        memory="live tensor bytes (GPU: torch.cuda allocator; CPU: the CPU allocator's trace under "
        "torch.profiler), min over repeats; peak_rss_gib: ru_maxrss of a fresh child per run, "
        "step_gib: above the resident size before the measured steps",
    )
    for _ in range(args.repeats):
        for mode in args.modes:
            results[mode].append(run_child(args, mode))
            done = {m: runs for m, runs in results.items() if runs}
            write_results("bench_memory", rows_from(args, done), config, args.out, COLUMNS, partial=True)
    rows = rows_from(args, results)
    write_results("bench_memory", rows, config, args.out, COLUMNS)
    return rows


if __name__ == "__main__":
    main()
