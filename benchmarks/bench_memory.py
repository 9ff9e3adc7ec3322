"""Peak memory and step time of one training step with activation checkpointing off and
on: pixelbert-r50 at 800x1333, micro-batch 2 (the issue's shape) by default.

    python benchmarks/bench_memory.py --modes none transformer all
    python benchmarks/bench_memory.py --preset tiny --image 192 256 --steps 1 --repeats 1   # smoke

Each (mode, repeat) runs in a fresh child process, in the order none, transformer, none,
transformer, ... (interleaved repeats), that builds the model and the hybrid SGD/AdamW
optimiser, takes ``--warmup`` untimed steps and ``--steps`` timed ones (forward, backward,
optimizer step, plain PyTorch: activations are the same under DeepSpeed). Memory on a CPU is
the child's resident-set high-water mark (``ru_maxrss``), given whole and as the part
above its resident size just before the first step (the activations, gradients and
optimizer state a step adds); on a GPU, ``torch.cuda.max_memory_allocated``.

Modes: ``PixelBertConfig.activation_checkpointing``: ``none``, ``transformer`` (the encoder
layers) or ``all`` (also the CNN stem and its four stages), through torch.utils.checkpoint.
An export whose config still holds the old bool maps it to ``none`` / ``transformer``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, spread, verdict, write_results  # noqa: E402

COLUMNS = [
    "preset",
    "mode",
    "image",
    "micro_batch",
    "peak_rss_gib",
    "step_gib",
    "step_s",
    "step_s_spread",
    "saving_vs_none",
    "verdict",
]
TARGET_SAVING = 0.40


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


def child(args) -> dict:
    """One mode in this process: build, warm up, time, report memory."""
    from bench_step import synthetic_batch

    from pixelbert_dist.model import build_model, preset_config
    from pixelbert_dist.train.optim import OptimConfig, build_optimizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_model(args.preset, **model_override(args.mode)).to(device).train()
    optimizer = build_optimizer(model, OptimConfig())
    batch = {
        k: v.to(device) if torch.is_tensor(v) else v
        for k, v in synthetic_batch(
            args.micro_batch, tuple(args.image), 40, preset_config(args.preset).vocab_size, 0
        ).items()
    }
    before = rss_gib() if device.type == "cpu" else torch.cuda.memory_allocated(device) / 2**30
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = model(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    if device.type == "cpu":
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    else:
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    return {
        "peak_rss_gib": peak,
        "before_step_gib": before,
        "step_gib": peak - before,
        "times": times,
        "loss": float(loss.detach()),
    }


def run_child(args, mode: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
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
        raise SystemExit(f"mode {mode} failed:\n{proc.stderr[-2000:]}")
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
            row["saving_vs_none"] = 1 - row["peak_rss_gib"] / base["peak_rss_gib"]
            row["step_saving_vs_none"] = 1 - row["step_gib"] / base["step_gib"]
            row["slowdown_vs_none"] = row["step_s"] / base["step_s"]
            row["verdict"] = verdict(row["saving_vs_none"], TARGET_SAVING) if row["mode"] == "all" else "-"
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
    for _ in range(args.repeats):
        for mode in args.modes:
            results[mode].append(run_child(args, mode))
    rows = rows_from(args, results)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "child", "mode")}
    config.update(
        baseline="mode none (no activation checkpointing), same preset, image and batch",
        target=f">= {TARGET_SAVING:.0%} lower peak memory with 'all'",
        memory="CPU: ru_maxrss of a fresh child per run (min over repeats); "
        "step_gib: above the resident size before the first step",
    )
    write_results("bench_memory", rows, config, args.out, COLUMNS)
    return rows


if __name__ == "__main__":
    main()
