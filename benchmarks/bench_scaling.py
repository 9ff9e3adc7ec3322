"""Estimated step time and scaling efficiency on 1 to 64 nodes of 8 GPUs (weak scaling: the
per-GPU micro-batch stays, the global batch grows), from a measured step time and the
bytes each ZeRO stage moves per step. A model, not a measurement; the model is this:

* compute: the measured (or projected) single-GPU step time ``t_c``; the backward pass is
  taken as 2/3 of it.
* traffic per GPU per step, ring collectives over ``n`` GPUs, ``P`` parameters of ``b``
  bytes (2 for bf16/fp16, 4 for fp32): ZeRO-0/1/2 reduce-scatter the gradients and
  all-gather the parameters, ``2 (n-1)/n P b`` (the same as one ring all-reduce);
  ZeRO-3 all-gathers the parameters again in the backward pass, ``3 (n-1)/n P b``.
* link: within one node the NVLink bus bandwidth; across nodes the ring is bound by each
  GPU's share of the node's network bandwidth. Latency: ``2 (n-1)`` ring hops of ``alpha``
  per bucket of ``bucket`` parameters.
* overlap: DeepSpeed's ``overlap_comm`` hides communication behind the backward pass;
  ``--overlap`` is the fraction of the backward time that can hide it.
* step = t_c + max(0, t_comm - overlap x t_bwd); efficiency = t_c / step.

    python benchmarks/bench_scaling.py --step-json results/X/bench_step.json
    python benchmarks/bench_scaling.py --project pixelbert-r50 --gpu H100 --mfu 0.4 --micro-batch 8
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PEAK_TFLOPS, results_dir, write_results  # noqa: E402

NODES = [1, 2, 4, 8, 16, 32, 64]
COLUMNS = ["source", "preset", "zero", "precision", "micro_batch", "nodes", "gpus", "compute_ms",
           "comm_ms", "step_ms", "samples_per_s", "efficiency"]
BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def comm_seconds(params: int, stage: int, precision: str, gpus: int, gpus_per_node: int,
                 intra_gbs: float, inter_gbs_per_gpu: float, alpha_us: float, bucket: int) -> float:
    """Seconds one GPU spends in the step's collectives (ring model, see the module doc)."""
    if gpus <= 1:
        return 0.0
    factor = 3 if stage == 3 else 2
    volume = factor * (gpus - 1) / gpus * params * BYTES[precision]
    bandwidth = intra_gbs if gpus <= gpus_per_node else min(intra_gbs, inter_gbs_per_gpu)
    buckets = math.ceil(params / bucket) * (factor / 2)
    return volume / (bandwidth * 1e9) + 2 * (gpus - 1) * alpha_us * 1e-6 * buckets


def scale(base: dict, args) -> list[dict]:
    """Rows for 1 GPU and ``NODES`` x gpus_per_node GPUs from one measured config."""
    t_c = base["step_ms"] / 1e3
    rows = []
    for gpus in [1] + [n * args.gpus_per_node for n in NODES]:
        t_comm = comm_seconds(base["params"], base["zero"], base["precision"], gpus, args.gpus_per_node,
                              args.intra_gbs, args.inter_gbps / 8 / args.gpus_per_node * args.nics,
                              args.alpha_us, args.bucket)
        step = t_c + max(0.0, t_comm - args.overlap * (2 / 3) * t_c)
        rows.append({"source": base["source"], "preset": base["preset"], "zero": base["zero"],
                     "precision": base["precision"], "micro_batch": base["micro_batch"],
                     "nodes": gpus / args.gpus_per_node if gpus > 1 else 1, "gpus": gpus,
                     "compute_ms": t_c * 1e3, "comm_ms": t_comm * 1e3, "step_ms": step * 1e3,
                     "samples_per_s": gpus * base["micro_batch"] / step, "efficiency": t_c / step,
                     "params": base["params"]})
    return rows


def measured_bases(path: str) -> list[dict]:
    data = json.loads(Path(path).read_text())
    bases = []
    for row in data["rows"]:
        if row.get("status") == "ok" and row.get("sampling", "on") == "on":
            bases.append({**row, "source": f"measured ({data['machine'].get('gpu') or 'cpu'})"})
    if not bases:
        raise SystemExit(f"{path}: no successful bench_step row with pixel sampling on")
    return bases


def projected_base(args) -> dict:
    """A step time from FLOPs at an assumed MFU on a named GPU: labelled as assumed."""
    from pixelbert_dist.model import build_model, preset_config, training_flops_per_sample

    if args.gpu not in PEAK_TFLOPS:
        raise SystemExit(f"--gpu {args.gpu!r}: known GPUs are {sorted(PEAK_TFLOPS)}")
    hw = tuple(math.ceil(x / 64) * 64 for x in args.image)
    flops = training_flops_per_sample(preset_config(args.project), hw, 40)
    peak = PEAK_TFLOPS[args.gpu][args.precision] * 1e12
    params = sum(p.numel() for p in build_model(args.project, device="meta").parameters())
    return {"source": f"projected ({args.gpu}, {args.mfu:.0%} MFU assumed)", "preset": args.project,
            "zero": args.zero, "precision": args.precision, "micro_batch": args.micro_batch,
            "params": params, "step_ms": flops * args.micro_batch / (args.mfu * peak) * 1e3}


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    keys = sorted({(r["source"], r["preset"], r["zero"], r["micro_batch"]) for r in rows})
    for key in keys:
        series = [r for r in rows if (r["source"], r["preset"], r["zero"], r["micro_batch"]) == key]
        ax.plot([r["gpus"] for r in series], [r["efficiency"] for r in series], marker="o",
                label=f"{key[1]} ZeRO-{key[2]} mb{key[3]} [{key[0]}]")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("GPUs (8 per node)")
    ax.set_ylabel("scaling efficiency")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--step-json", help="bench_step.json whose measured step times to scale")
    parser.add_argument("--project", help="also project this preset from FLOPs at --mfu on --gpu")
    parser.add_argument("--gpu", default="H100")
    parser.add_argument("--mfu", type=float, default=0.4)
    parser.add_argument("--precision", default="bf16", choices=list(BYTES))
    parser.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3])
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--image", nargs=2, type=int, default=[800, 1333])
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--intra-gbs", type=float, default=360.0,
                        help="NVLink bus bandwidth per GPU, GB/s (H100 SXM: ~360 achieved)")
    parser.add_argument("--inter-gbps", type=float, default=400.0, help="one NIC's speed, Gb/s")
    parser.add_argument("--nics", type=int, default=8, help="NICs per node (DGX H100: 8 x 400G)")
    parser.add_argument("--alpha-us", type=float, default=8.0, help="latency per ring hop, µs")
    parser.add_argument("--bucket", type=int, default=50_000_000, help="parameters per bucket")
    parser.add_argument("--overlap", type=float, default=0.5,
                        help="fraction of the backward pass that hides communication")
    parser.add_argument("--out", default=None, help="results folder")
    args = parser.parse_args(argv)
    if not args.step_json and not args.project:
        parser.error("give --step-json and/or --project")
    return args


def main(argv=None) -> list[dict]:
    args = parse(argv)
    bases = (measured_bases(args.step_json) if args.step_json else [])
    bases += [projected_base(args)] if args.project else []
    rows = [row for base in bases for row in scale(base, args)]
    config = {k: v for k, v in vars(args).items() if k != "out"}
    config["model"] = __doc__.split("model is this:")[1].split("    python")[0].strip()
    write_results("bench_scaling", rows, config, args.out, COLUMNS)
    print(f"wrote {plot(rows, results_dir(args.out) / 'bench_scaling.png')}")
    return rows


if __name__ == "__main__":
    main()
