"""Modelled scaling efficiency of one optimizer step on 1 to 64 nodes of 8 GPUs, per ZeRO
stage and setting, from the traffic DeepSpeed actually sends (comm_model.py, checked
against DeepSpeed's comms logger by bench_comms.py). A model, not a measurement:

* compute per micro-batch ``t``: FLOPs per sample (``training_flops_per_sample`` at the
  padded image size, 100 sampled pixels) x micro-batch / (MFU x the GPU's dense peak), or a
  step time a GPU measured (``--step-json`` of bench_step on a GPU; CPU rows are refused:
  a CPU step says nothing about a GPU cluster). Forward = t/3, backward = 2t/3.
* an optimizer step = ``grad_accum`` micro-batches; the bytes per step per ZeRO stage are
  comm_model's (ZeRO-1 reduces once per step, ZeRO-2 every micro-batch, ZeRO-3 gathers
  parameters and reduce-scatters gradients every micro-batch).
* links: a ring inside a node runs at the NVLink bus bandwidth, across nodes at each GPU's
  NIC share; each collective call costs ``factor`` passes round a ring that crosses the
  network once per node (``alpha_inter``) and NVLink otherwise (``alpha_intra``); calls per
  phase = elements / bucket (prefetch coalesces ZeRO-3 gathers up to the bucket).
* overlap: ``overlap_comm`` hides a phase behind the compute it runs beside (the
  gradient reduction behind the backward, ZeRO-3's gathers behind the forward) up to the
  ``overlap`` share of it; ZeRO-1/2's parameter all-gather after the update is never hidden.
* step = compute + exposed communication; efficiency = compute / step.

    python -m benchmarks.bench_scaling --preset pixelbert-r50 --gpu H100 --mfu 0.4 --micro-batch 8 32
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict
from pathlib import Path

from benchmarks.comm_model import Cluster, ParamCounts, Setting, efficiency
from benchmarks.common import results_dir, write_results

NODES = [1, 2, 4, 8, 16, 32, 64]
COLUMNS = [
    "preset",
    "setting",
    "micro_batch",
    "grad_accum",
    "nodes",
    "compute_ms",
    "exposed_comm_ms",
    "efficiency",
    "meets_90",
]
TARGET = 0.9


def micro_seconds_projected(preset: str, gpu: str, mfu: float, micro: int, image, precision: str) -> float:
    from pixelbert_dist.metrics import PEAK_TFLOPS
    from pixelbert_dist.model import preset_config, training_flops_per_sample

    if gpu not in PEAK_TFLOPS:
        raise SystemExit(f"--gpu {gpu!r}: known GPUs are {sorted(PEAK_TFLOPS)}")
    hw = tuple(math.ceil(x / 64) * 64 for x in image)
    flops = training_flops_per_sample(preset_config(preset), hw, 40)
    return flops * micro / (mfu * PEAK_TFLOPS[gpu][precision] * 1e12)


def micro_seconds_measured(path: str, preset: str, micro: int) -> float:
    data = json.loads(Path(path).read_text())
    if not data["machine"].get("gpu"):
        raise SystemExit(
            f"{path}: measured on a CPU ({data['machine'].get('cpu')}); a CPU step time "
            "says nothing about a GPU cluster: give a GPU's bench_step.json or --mfu"
        )
    rows = [
        r
        for r in data["rows"]
        if r.get("status") == "ok"
        and r["preset"] == preset
        and r["micro_batch"] == micro
        and r.get("sampling", "on") == "on"
    ]
    if not rows:
        raise SystemExit(f"{path}: no ok row for {preset} micro-batch {micro} with pixel sampling on")
    return min(r["step_ms"] for r in rows) / 1e3


def settings_grid(samples_per_gpu: list[int], micro: int) -> list[Setting]:
    """The shipped JSONs' settings and the knobs that matter, at each accumulation."""
    grid = []
    for per_gpu in samples_per_gpu:
        if per_gpu < micro:
            continue
        g = per_gpu // micro
        grid += [
            Setting(1, g, overlap=0.0),
            Setting(1, g, overlap=0.5),
            Setting(1, g, bucket=5e8),
            Setting(2, g),
            Setting(2, g, overlap=0.9),
            Setting(2, g, multi_rank_allreduce=False),
            Setting(2, g, bucket=5e8),
            Setting(3, g),
            Setting(3, g, overlap=0.9),
            Setting(3, g, regather=True),
            Setting(3, g, regather=True, hpz=8),
            Setting(3, g, regather=True, hpz=8, quantized_weights=True, quantized_gradients=True),
        ]
    return grid


def project(
    counts: ParamCounts, t_micro: float, settings: list[Setting], cluster: Cluster, preset: str, micro: int
) -> list[dict]:
    rows = []
    for s in settings:
        for nodes in NODES:
            gpus = nodes * cluster.gpus_per_node
            row = {
                "preset": preset,
                "setting": s.label(),
                "micro_batch": micro,
                "grad_accum": s.grad_accum,
                "nodes": nodes,
                "gpus": gpus,
                **asdict(s),
                **efficiency(counts, s, gpus, t_micro, cluster),
            }
            row["meets_90"] = "yes" if row["efficiency"] >= TARGET else "no"
            rows.append(row)
    return rows


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label in dict.fromkeys(r["setting"] for r in rows):
        series = [r for r in rows if r["setting"] == label]
        if series[0]["micro_batch"] == 8 and "bucket 5e+07 overlap 50%" in label and not label.split("50%")[1]:
            ax.plot(
                [r["nodes"] for r in series],
                [r["efficiency"] for r in series],
                marker="o",
                label=label,
                linestyle="-" if series[0]["grad_accum"] > 1 else "--",
            )
    ax.axhline(TARGET, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("nodes (8 GPUs each)")
    ax.set_ylabel("modelled efficiency")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="pixelbert-r50")
    parser.add_argument("--step-json", help="a GPU's bench_step.json: its measured step time per micro-batch")
    parser.add_argument("--gpu", default="H100")
    parser.add_argument("--mfu", type=float, default=0.4)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument(
        "--micro-batch",
        nargs="+",
        type=int,
        default=[8, 32],
        help="per-GPU micro-batches (32 at 800x1333 needs activation checkpointing)",
    )
    parser.add_argument(
        "--samples-per-gpu",
        nargs="+",
        type=int,
        default=[8, 64, 256],
        help="samples per GPU per optimizer step (64: the paper's 4096 on 64 GPUs)",
    )
    parser.add_argument("--image", nargs=2, type=int, default=[800, 1333])
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--intra-gbs", type=float, default=360.0, help="NVLink bus bandwidth per GPU, GB/s")
    parser.add_argument("--inter-gbs", type=float, default=40.0, help="network per GPU, GB/s (400 Gb/s NIC)")
    parser.add_argument("--alpha-inter-us", type=float, default=5.0, help="latency of a network hop, µs")
    parser.add_argument("--alpha-intra-us", type=float, default=1.0, help="latency of an NVLink hop, µs")
    parser.add_argument("--out", default=None, help="results folder")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse(argv)
    cluster = Cluster(args.gpus_per_node, args.intra_gbs, args.inter_gbs, args.alpha_inter_us, args.alpha_intra_us)
    counts, rows, micro_ms = ParamCounts.of_preset(args.preset), [], {}
    source = (
        args.step_json if args.step_json else f"FLOPs at {args.mfu:.0%} MFU of {args.gpu} {args.precision} (assumed)"
    )
    for micro in args.micro_batch:
        t_micro = (
            micro_seconds_measured(args.step_json, args.preset, micro)
            if args.step_json
            else micro_seconds_projected(args.preset, args.gpu, args.mfu, micro, args.image, args.precision)
        )
        micro_ms[micro] = t_micro * 1e3
        rows += project(counts, t_micro, settings_grid(args.samples_per_gpu, micro), cluster, args.preset, micro)
    config = {k: v for k, v in vars(args).items() if k != "out"}
    config.update(
        compute_source=source,
        micro_ms=micro_ms,
        params=asdict(counts),
        model=__doc__.split("A model, not a measurement:")[1].split("    python")[0].strip(),
        target=f"efficiency >= {TARGET} at 64 nodes",
        baseline="the compute alone (efficiency 1: no exposed communication); the traffic "
        "is checked against DeepSpeed's comms logger by bench_comms",
    )
    shown = [r for r in rows if r["nodes"] == NODES[-1]]
    write_results("bench_scaling", rows, config, args.out, COLUMNS, shown=shown)
    print(f"wrote {plot(rows, results_dir(args.out) / 'bench_scaling.png')}")
    return rows


if __name__ == "__main__":
    main()
