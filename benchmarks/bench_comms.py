"""Measured bytes per optimizer step from DeepSpeed's communication logger, next to what
``bench_scaling``'s traffic model predicts, for each ZeRO stage and gradient accumulation.

    deepspeed --num_gpus 2 --module benchmarks.bench_comms --presets tiny --zero 1 2 3 --grad-accum 1 4
    deepspeed --num_gpus 2 --module benchmarks.bench_comms --presets pixelbert-r50 --image 128 128
    python -m benchmarks.bench_comms --slurm --nodes 2 --presets tiny --out DIR   # Slurm jobs

Each config builds ``build_model(preset)`` with the hybrid optimiser and the stage's JSON
from deepspeed_configs/ (filled as the trainer fills it) plus ``"comms_logger": {"enabled":
true, "prof_all": true}``, runs ``--warmup`` optimizer steps (ZeRO-3 records its parameter
trace in the first), clears the logger, runs ``--steps`` optimizer steps of ``grad_accum``
micro-batches each, and divides the logged message bytes per collective by ``--steps``.
The logger counts every collective DeepSpeed issues through ``deepspeed.comm``, with the
message size it logs (the input tensor: the local shard for an all-gather, the full
buffer for an all-reduce). The byte count depends on parameter counts, dtype, stage,
accumulation and buckets, not on the image size, so pixelbert-r50 runs at a small image.

``--slurm`` submits one job per config (``--nodes`` nodes, one gloo rank per node,
through slurm_bench.py and the repo's job layer), waits for them, and writes the same
table with each job's id, Slurm state and nodes in the JSON's config.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

from benchmarks.bench_step import synthetic_batch, to_device
from benchmarks.comm_model import ParamCounts, predict_logged_bytes, wire_bytes, zero_settings
from benchmarks.common import ROOT, results_dir, write_results
from benchmarks.slurm_bench import EntryCall, add_slurm_args, submit_config, submit_each, wait_all
from pixelbert_dist.train.run import close_started_group

COLUMNS = [
    "preset",
    "zero",
    "grad_accum",
    "world",
    "op",
    "predicted_mb",
    "measured_mb",
    "error",
    "calls",
    "wire_mb_predicted",
    "wire_mb_measured",
]


def build_engine(preset: str, stage: int, grad_accum: int, micro: int, world: int, ds_extra: dict):
    import deepspeed
    import torch

    from pixelbert_dist.distributed.ds_config import fill_deepspeed_config, precision_of
    from pixelbert_dist.model import build_model
    from pixelbert_dist.train.optim import build_optimizer
    from pixelbert_dist.train.config import OptimConfig

    torch.manual_seed(0)
    model = build_model(preset)
    ds = fill_deepspeed_config(
        ROOT / "deepspeed_configs" / f"zero{stage}.json",
        micro_batch=micro,
        grad_accum=grad_accum,
        world_size=world,
        grad_clip=1.0,
        precision="fp32",
    )
    ds["zero_optimization"].update(ds_extra)
    ds.update(steps_per_print=10**9, comms_logger={"enabled": True, "prof_all": True, "verbose": False, "debug": False})
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, OptimConfig()), config=ds)
    return engine, ds, precision_of(ds)


def optimizer_steps(engine, source, count: int, grad_accum: int, dtype) -> None:
    import torch

    for _ in range(count * grad_accum):
        out = engine(to_device(next(source), torch.device("cpu"), dtype))
        engine.backward(out["loss"])
        engine.step()  # DeepSpeed steps the optimizer on the accumulation boundary only


def logged_bytes_per_step(steps: int) -> dict[str, dict]:
    """{op: {"bytes": per optimizer step, "calls": per optimizer step}} from the logger."""
    from deepspeed.comm.comm import comms_logger

    out = {}
    for name, sizes in comms_logger.get_raw_data().items():
        total = sum(size * vals[0] for size, vals in sizes.items())
        calls = sum(vals[0] for vals in sizes.values())
        out[name] = {"bytes": total / steps, "calls": calls / steps}
    return out


def measure(args, preset: str, stage: int, grad_accum: int, world: int, rank: int) -> list[dict]:
    import deepspeed.comm as ds_comm
    import torch
    from deepspeed.comm.comm import comms_logger

    from pixelbert_dist.model import preset_config

    engine, ds, precision = build_engine(preset, stage, grad_accum, args.micro_batch, world, args.ds_extra)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    vocab = preset_config(preset).vocab_size
    source = itertools.cycle(
        [synthetic_batch(args.micro_batch, tuple(args.image), args.text_len, vocab, seed=rank * 10 + s) for s in (0, 1)]
    )
    optimizer_steps(engine, source, args.warmup, grad_accum, dtype)
    ds_comm.barrier()
    comms_logger.reset_data()
    optimizer_steps(engine, source, args.steps, grad_accum, dtype)
    measured = logged_bytes_per_step(args.steps)
    comms_logger.reset_data()
    elem_bytes = torch.tensor([], dtype=engine.communication_data_type).element_size()
    counts = ParamCounts.of_preset(preset, zero_settings(ds)["persistence"])
    predicted = predict_logged_bytes(counts, ds, world, elem_bytes)
    engine.destroy()
    rows = []
    for op in sorted(set(measured) | set(predicted)):
        pred, meas = predicted.get(op, 0.0), measured.get(op, {}).get("bytes", 0.0)
        rows.append(
            {
                "preset": preset,
                "zero": stage,
                "grad_accum": grad_accum,
                "world": world,
                "op": op,
                "predicted_mb": pred / 1e6,
                "measured_mb": meas / 1e6,
                "error": (pred - meas) / meas if meas else (0.0 if not pred else None),
                "calls": measured.get(op, {}).get("calls", 0.0),
                "precision": precision,
            }
        )
    total_pred, total_meas = sum(predicted.values()), sum(v["bytes"] for v in measured.values())
    rows.append(
        {
            "preset": preset,
            "zero": stage,
            "grad_accum": grad_accum,
            "world": world,
            "op": "TOTAL",
            "predicted_mb": total_pred / 1e6,
            "measured_mb": total_meas / 1e6,
            "error": (total_pred - total_meas) / total_meas,
            "precision": precision,
            "calls": sum(v["calls"] for v in measured.values()),
            "wire_mb_predicted": wire_bytes(predicted, world) / 1e6,
            "wire_mb_measured": wire_bytes({k: v["bytes"] for k, v in measured.items()}, world) / 1e6,
            "params_trainable": counts.trainable,
            "params_total": counts.total,
            "params_persistent": counts.persistent,
        }
    )
    return rows


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny"])
    parser.add_argument("--zero", nargs="+", type=int, default=[1, 2, 3], choices=[1, 2, 3])
    parser.add_argument("--grad-accum", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--image", nargs=2, type=int, default=[64, 64], metavar=("H", "W"))
    parser.add_argument("--text-len", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2, help="measured optimizer steps per config")
    parser.add_argument("--warmup", type=int, default=1, help="optimizer steps before measuring")
    parser.add_argument(
        "--ds-extra",
        type=_json,
        default={},
        help="JSON merged into zero_optimization, e.g. '{\"reduce_bucket_size\": 1e6}'",
    )
    parser.add_argument("--out", default=None, help="results folder")
    parser.add_argument("--name", default="bench_comms", help="results file name (no .json)")
    parser.add_argument("--append", action="store_true", help="add the rows to an existing results file")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the launcher's
    add_slurm_args(parser)
    return parser.parse_args(argv)


def _json(text: str) -> dict:
    return json.loads(text)


def measure_all(args):
    """This process's place in the job (a DistEnv) and its rows for every config of ``args``."""
    import torch.distributed as dist

    from pixelbert_dist.distributed.env import init_distributed

    env = init_distributed()
    world, rank = dist.get_world_size(), dist.get_rank()
    rows = []
    for preset, stage, accum in itertools.product(args.presets, args.zero, args.grad_accum):
        rows += measure(args, preset, stage, accum, world, rank)
    return env, rows


def slurm_task(argv: list[str]) -> dict:
    """What every task of a ``--slurm`` job runs: its config on the job's ranks."""
    import torch.distributed as dist

    env, rows = measure_all(parse(argv))
    # before the interpreter exits: gloo's exit-time destructors sometimes abort a
    # finished process (exit 250), and Slurm would call the job FAILED
    dist.destroy_process_group()
    return {
        "rank": env.rank,
        "node": os.environ.get("SLURMD_NODENAME"),
        "rendezvous": f"{env.launcher}: {env.master_addr}:{env.master_port} ({env.source})",
        "rows": rows,
    }


def job_argv(args, preset: str, stage: int, accum: int) -> tuple[str, ...]:
    """The command line of the job that measures one config."""
    return tuple(
        map(
            str,
            ["--presets", preset, "--zero", stage, "--grad-accum", accum, "--micro-batch", args.micro_batch]
            + ["--image", *args.image, "--text-len", args.text_len, "--steps", args.steps]
            + ["--warmup", args.warmup, "--ds-extra", json.dumps(args.ds_extra)],
        )
    )


def run_on_slurm(args) -> tuple[list[dict], list[dict]]:
    """Submit one job per config, wait; rank 0's rows and one record per job."""
    configs = list(itertools.product(args.presets, args.zero, args.grad_accum))
    args.slurm_dir = args.slurm_dir or str(results_dir(args.out) / "slurm")
    calls = [EntryCall("benchmarks.bench_comms", "slurm_task", job_argv(args, *config)) for config in configs]
    jobs = submit_each(calls, submit_config(args, "bench_comms"))
    print(f"submitted {len(jobs)} job(s): {' '.join(job.job_id for job in jobs)} (one at a time)", flush=True)
    rows, records = [], []
    for (preset, stage, accum), record in zip(configs, wait_all(jobs, args.job_timeout_s)):
        tasks = record.pop("tasks")
        record.update(
            config=f"{preset} ZeRO-{stage} grad_accum {accum}",
            task_nodes=[t["result"]["node"] if "result" in t else None for t in tasks],
            rendezvous=tasks[0]["result"]["rendezvous"] if "result" in tasks[0] else None,
            errors=[t["error"] for t in tasks if "error" in t],
        )
        records.append(record)
        if "result" in tasks[0]:
            rows += [dict(row, job_id=record["job_id"]) for row in tasks[0]["result"]["rows"]]
        else:
            print(f"job {record['job_id']} ({record['config']}): {record['errors'][0]}", file=sys.stderr)
    return rows, records


def main(argv=None) -> list[dict]:
    args = parse(argv)
    if args.slurm:
        rank, (rows, jobs) = 0, run_on_slurm(args)
    else:
        (env, rows), jobs = measure_all(args), None
        rank = env.rank
    if rank == 0:
        config = {k: v for k, v in vars(args).items() if k not in ("out", "local_rank")}
        config["measured"] = "DeepSpeed comms_logger, logged message bytes per optimizer step (rank 0)"
        config["baseline"] = "DeepSpeed's comms logger (measured) for comm_model's prediction"
        config["target"] = "|predicted - measured| / measured <= 5% for every TOTAL row"
        path = results_dir(args.out) / f"{args.name}.json"
        if args.append and path.is_file():  # one launch per config keeps each rank's memory small
            before = json.loads(path.read_text())
            rows = before["rows"] + rows
            jobs = before["config"].get("slurm_jobs", []) + jobs if jobs is not None else None
        if jobs is not None:
            config["slurm_jobs"] = jobs
        write_results(args.name, rows, config, args.out, COLUMNS)
    return rows


if __name__ == "__main__":
    main()
    close_started_group()
