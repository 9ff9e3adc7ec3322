"""Bytes each rank reads to resume, against its share; the universal conversion's time.

    python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        -m benchmarks.bench_resume_reads --preset pixelbert-r50 --out DIR
    python -m benchmarks.bench_resume_reads --simulate DIR/resume_reads.json --worlds 2 8 64 512

The first form: every rank builds the preset under ZeRO-2 (fp32, CPU, gloo), takes one
optimiser step, saves synchronously, then resumes that checkpoint as a restarted job does
(``find_checkpoint`` verifies it, the load takes what the verification read): each rank's
checkpoint bytes read from the file system, verification included, against its share
(total / world; target <= 1.1x). Next to it, what the code before this change read (its
verification took files r, r + W, ... of the sorted list; its load read each rank's own
files, and rank 0 the model file), derived from the same file sizes. Then rank 0 converts
the checkpoint to DeepSpeed's universal format, timed. Rank 0 writes ``resume_reads.json``.

The second form plans the reads at larger world sizes from that file table: the model
file as measured, the optimizer shards' total split evenly over W ranks (ZeRO-2
partitions evenly; each file's own pickled bookkeeping is not modelled), a rank-state
file per rank as measured. Bytes per rank come from ``shared_load.plan_reads``, the
function the resume itself uses.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from benchmarks.bench_checkpoint import build_engine
from pixelbert_dist.train.run import close_started_group

# The checkpoint modules import torch and DeepSpeed: imported in the functions that use
# them, so --help answers without either.


def before_change(sizes: dict[str, int], world: int) -> list[int]:
    """Bytes per rank of the previous resume: round-robin verification, then the load."""
    from pixelbert_dist.checkpoint.shared_load import owner

    names = sorted(sizes)
    out = []
    for rank in range(world):
        verify = sum(sizes[n] for n in names[rank::world])
        own = sum(size for name, size in sizes.items() if owner(name, world) == rank)
        shared = sum(size for name, size in sizes.items() if name.endswith(".pt") and owner(name, world) is None)
        out.append(verify + own + (shared if rank == 0 else 0))
    return out


def ratios(reads: list[int], total: int) -> dict:
    share = total / len(reads)
    return {"bytes_per_rank": reads, "share": share, "worst_over_share": max(reads) / share}


def measure(args) -> None:
    import torch

    from pixelbert_dist.checkpoint.checkpointer import resume_engine, save_checkpoint
    from pixelbert_dist.checkpoint.choose import find_checkpoint
    from pixelbert_dist.checkpoint.files import read_meta
    from pixelbert_dist.checkpoint.shared_load import bytes_per_rank, plan_reads
    from pixelbert_dist.checkpoint.universal import to_universal
    from pixelbert_dist.distributed.env import init_distributed

    env = init_distributed()
    engine = build_engine(args.preset, env.world_size)
    folder = args.out / "work" / "checkpoints"  # one path on every rank
    try:
        tag_dir = save_checkpoint(engine, folder, 1, {"trainer": {"step": 1}}, keep_last=1, rank_state={"x": 1})
        start = time.perf_counter()
        chosen = find_checkpoint(folder, "auto", keep_reads=True)  # as Checkpointer.choose, before the load
        read = resume_engine(engine, chosen)[1]
        resume_s = time.perf_counter() - start
        reads = [None] * env.world_size
        torch.distributed.all_gather_object(reads, read)
        start = time.perf_counter()
        to_universal(tag_dir)
        universal_s = time.perf_counter() - start
        sizes = {name: entry["size"] for name, entry in read_meta(tag_dir)["files"].items()}
    finally:
        torch.distributed.barrier()
        if env.rank == 0:
            shutil.rmtree(args.out / "work", ignore_errors=True)
    if env.rank != 0:
        return
    total = sum(sizes.values())
    result = {
        "preset": args.preset,
        "world_size": env.world_size,
        "file_sizes": sizes,
        "measured": ratios(reads, total),
        "planned": ratios(bytes_per_rank(plan_reads(sizes, env.world_size)), total),
        "before_change_derived": ratios(before_change(sizes, env.world_size), total),
        "resume_seconds_rank0": resume_s,
        "universal_conversion_seconds": universal_s,
    }
    print(json.dumps(result, indent=2))
    (args.out / "resume_reads.json").write_text(json.dumps(result, indent=2) + "\n")


def scaled_sizes(sizes: dict[str, int], world: int, saved_world: int) -> dict[str, int]:
    """The file table of the same model saved by ``world`` ranks (see the module doc)."""
    from pixelbert_dist.checkpoint.shared_load import owner

    optim = sum(size for name, size in sizes.items() if "optim_states" in name)
    state = max(size for name, size in sizes.items() if name.startswith("rank_"))
    out = {name: size for name, size in sizes.items() if owner(name, saved_world) is None}
    for rank in range(world):
        out[f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"] = optim // world
        out[f"rank_{rank:05d}_state.pt"] = state
    return out


def simulate(path: Path, worlds: list[int]) -> None:
    from pixelbert_dist.checkpoint.shared_load import bytes_per_rank, plan_reads

    measured = json.loads(path.read_text())
    rows = []
    for world in worlds:
        sizes = scaled_sizes(measured["file_sizes"], world, measured["world_size"])
        total = sum(sizes.values())
        now = ratios(bytes_per_rank(plan_reads(sizes, world)), total)
        before = ratios(before_change(sizes, world), total)
        rows.append(
            {
                "world": world,
                "checkpoint_bytes": total,
                "share": now["share"],
                "worst_now": max(now["bytes_per_rank"]),
                "worst_over_share_now": now["worst_over_share"],
                "worst_over_share_before": before["worst_over_share"],
                "summed_reads_before": sum(before["bytes_per_rank"]),
            }
        )
        row = rows[-1]
        print(
            f"W={world:4d}: share {row['share'] / 1e6:9.2f} MB, worst now {row['worst_now'] / 1e6:9.2f} MB "
            f"({row['worst_over_share_now']:.3f}x), before {row['worst_over_share_before']:.2f}x; summed reads "
            f"now {total / 1e9:.2f} GB, before {row['summed_reads_before'] / 1e9:.2f} GB"
        )
    (path.parent / "resume_reads_simulated.json").write_text(json.dumps(rows, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="pixelbert-r50")
    parser.add_argument("--out", type=Path, help="results folder (the save goes to OUT/work, removed after)")
    parser.add_argument("--simulate", type=Path, help="a resume_reads.json: plan its checkpoint at --worlds")
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 8, 64, 512])
    args = parser.parse_args()
    if args.simulate:
        simulate(args.simulate, args.worlds)
    else:
        measure(args)


if __name__ == "__main__":
    main()
    close_started_group()
