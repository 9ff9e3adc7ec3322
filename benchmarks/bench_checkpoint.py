"""Training blocked per checkpoint save: asynchronous vs synchronous, side by side.

    python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        -m benchmarks.bench_checkpoint --preset pixelbert-r50 --repeats 3 --out DIR

Every rank builds the preset with the hybrid optimiser under ZeRO-2 (fp32, CPU, gloo),
takes one optimiser step (so the optimiser state exists), then saves alternately in the
two modes (sync, async, sync, async, ...: a neighbour's load hits both alike). For each
save: ``blocked`` is how long the step loop waited (``Checkpointer.save`` returning);
for an async save ``background`` is how long its writer thread took after that. The
figure of merit is blocked(async) / blocked(sync), the issue's target <= 10%. Then every
rank resumes the last synchronous save and reports the checkpoint bytes it read against
its share (target <= 1.1x). Rank 0 prints the table and writes ``checkpoint_saves.json``
into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import shutil
import time
from pathlib import Path

from pixelbert_dist.train.run import close_started_group


ROOT = Path(__file__).resolve().parents[1]


def build_engine(preset: str, world: int):
    import deepspeed  # here and in main, not at the top: --help answers without them
    import torch

    from pixelbert_dist.distributed.ds_config import fill_deepspeed_config
    from pixelbert_dist.model import build_model
    from pixelbert_dist.train.config import OptimConfig
    from pixelbert_dist.train.optim import build_optimizer

    torch.manual_seed(0)
    model = build_model(preset)
    ds = fill_deepspeed_config(
        ROOT / "deepspeed_configs" / "zero2.json", micro_batch=1, grad_accum=1, world_size=world, grad_clip=1.0
    )
    ds["bf16"]["enabled"] = False
    ds["steps_per_print"] = 10**9
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, OptimConfig()), config=ds)
    # one step through every parameter, so that the optimiser state (momentum, Adam moments) exists
    loss = sum((p.float() ** 2).sum() for p in engine.module.parameters() if p.requires_grad) * 1e-12
    engine.backward(loss)
    engine.step()
    return engine


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="pixelbert-r50")
    parser.add_argument("--repeats", type=int, default=3, help="saves per mode")
    parser.add_argument(
        "--out", type=Path, required=True, help="results folder (the saves go to OUT/work, removed after)"
    )
    args = parser.parse_args()
    import torch

    from pixelbert_dist.checkpoint.checkpointer import Checkpointer, resume_engine
    from pixelbert_dist.distributed.env import init_distributed

    env = init_distributed()
    engine = build_engine(args.preset, env.world_size)
    rows = []
    run = args.out / "work"  # one path on every rank
    try:
        savers = {mode: Checkpointer(run / mode, keep_last=1, async_save=mode == "async") for mode in ("sync", "async")}
        for saver in savers.values():
            saver.attach(engine)
        for step in range(1, args.repeats + 1):
            for mode, saver in savers.items():
                saver.save(step, {"trainer": {"step": step}}, rank_state={"data": {"step": step}})
                blocked, copy = saver.last_blocked_seconds, saver.last_copy_seconds
                start = time.perf_counter()
                saver.wait()
                background = time.perf_counter() - start
                torch.distributed.barrier()
                rows.append(
                    {"mode": mode, "step": step, "blocked_s": blocked, "copy_s": copy, "background_s": background}
                )
        size = folder_bytes(run / "sync" / "checkpoints") if env.rank == 0 else 0
        # resume: the checkpoint bytes each rank reads from the file system, against its share
        tag_dir = run / "sync" / "checkpoints" / f"step_{args.repeats:08d}"
        read = resume_engine(engine, tag_dir)[1]
        reads = [None] * env.world_size
        torch.distributed.all_gather_object(reads, read)
    finally:
        torch.distributed.barrier()
        if env.rank == 0:
            shutil.rmtree(run, ignore_errors=True)
    if env.rank != 0:
        return
    blocked = {m: statistics.median(r["blocked_s"] for r in rows if r["mode"] == m) for m in savers}
    summary = {
        "preset": args.preset,
        "world_size": env.world_size,
        "checkpoint_bytes": size,
        "median_blocked_s": blocked,
        "async_over_sync": blocked["async"] / blocked["sync"],
        "resume_bytes_read_per_rank": reads,
        "resume_read_over_share": [r / (size / env.world_size) for r in reads],
    }
    for row in rows:
        print(
            f"{row['mode']:>5} save {row['step']}: blocked {row['blocked_s']:.2f} s (host copy "
            f"{row['copy_s']:.2f} s), then {row['background_s']:.2f} s in the background"
        )
    print(json.dumps(summary, indent=2))
    (args.out / "checkpoint_saves.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
    close_started_group()
