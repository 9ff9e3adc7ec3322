"""The GPU check's end-to-end rows: ``launch/pretrain.py`` as a user runs it, one phase per call.

    python -m benchmarks.gpu_pretrain e2e   --work DIR --out RESULTS  # bf16 ZeRO-2: 30 steps, save,
                                                                     # SIGTERM + resume, eval, export
    python -m benchmarks.gpu_pretrain fp32  --work DIR --out RESULTS  # the first 10 steps in fp32
    python -m benchmarks.gpu_pretrain zero3 --work DIR --out RESULTS  # ZeRO-3 smoke steps (bf16)
    python -m benchmarks.gpu_pretrain fp16  --work DIR --out RESULTS  # fp16 with its loss scaler
    ... --cpu                                                         # the same plumbing on a CPU

Every run is a real ``python launch/pretrain.py`` process (plain single-rank start) over
synthetic shards in ``--work``: the tiny preset (trainable BatchNorm, activation
checkpointing "all") at the paper's image size (800x1333) with the nvjpeg decoder, so
everything downstream of the decode (resize, pad, the model, DeepSpeed, fused AdamW,
checkpoints, evaluation, the export) runs on the GPU. Each phase adds its row to
``RESULTS/bench_pretrain.json`` as it finishes. The exit code is 1 when a phase's check
fails (a resumed loss that differs from the uninterrupted run's, a missing export, a
non-finite loss), so the GPU check prints its log.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import ROOT, write_results

RESULT = "bench_pretrain"
COLUMNS = ["phase", "precision", "zero", "steps", "seconds", "first_loss", "last_loss", "check", "verdict"]
GPU = {"backend": "nvjpeg", "image": (800, 1333), "micro": 8, "precision": "bf16", "steps": 30, "stop": 15}
CPU = {"backend": "pil", "image": (64, 128), "micro": 4, "precision": "fp32", "steps": 6, "stop": 3}
# a run stopped by SIGTERM saves where it stands; these many steps later nothing may differ
# from the uninterrupted run but what two uninterrupted GPU runs differ by (cuDNN picks
# non-deterministic kernels): the steps before the stop measure that
NOISE_FACTOR = 3.0


def shards(work: Path, sizes: dict) -> dict:
    """Train/val synthetic shards for the runs (made once per work folder)."""
    from pixelbert_dist.data.builders.synthetic import build_synthetic

    root = work / "shards"
    if not (root / "val" / "manifest.json").is_file():
        need = sizes["steps"] * sizes["micro"] + 64
        build_synthetic(root, need, seed=0, val_fraction=0.2, samples_per_shard=64, progress=False)
    return {"train": root / "train", "val": root / "val"}


def overrides(run_dir: Path, data: dict, sizes: dict, precision: str, steps: int) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"data.train_shards={data['train']}",
        f"data.val_shards={data['val']}",
        f"data.backend={sizes['backend']}",
        "data.num_workers=1",
        f"data.image_shorter={sizes['image'][0]}",
        f"data.image_max={sizes['image'][1]}",
        "model.preset=tiny",
        "train.activation_checkpointing=all",  # recomputation under DeepSpeed's bf16, trainable BatchNorm
        f"train.micro_batch={sizes['micro']}",
        f"train.precision={precision}",
        f"train.max_steps={steps}",
        "train.log_every=1",
        f"train.save_every={max(1, sizes['stop'] // 3)}",
        "train.eval_every=0",
        "train.eval_batches=2",
        "train.retrieval_size=8",
        "schedule.warmup_steps=2",
    ]


def pretrain_cmd(ds_config: str, args: list[str]) -> list[str]:
    return [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--deepspeed_config", ds_config, *args]


def run_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def run(cmd: list[str], stop_after: int | None = None, run_dir: Path | None = None) -> float:
    """Run ``cmd`` (its output goes to this process's, the step's log); with ``stop_after``,
    SIGTERM its process group (the trainer and its loader workers, as Slurm signals a job
    step) once that many train rows are logged. Seconds taken; raises on a non-zero exit."""
    start = time.perf_counter()
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(), start_new_session=True)
    try:
        if stop_after is not None:
            while proc.poll() is None and len(train_rows(run_dir)) < stop_after:
                time.sleep(0.1)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        code = proc.wait()
    finally:  # this process stopped (the check's time limit): its own session must not outlive it
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if code != 0:
        raise RuntimeError(f"{Path(cmd[1]).name} exited {code} (its output is above)")
    return time.perf_counter() - start


def rows_of(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_rows(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in rows_of(run_dir) if r["split"] == "train"}


def losses(run_dir: Path) -> dict[int, float]:
    return {step: row["loss"] for step, row in train_rows(run_dir).items()}


def max_diff(a: dict[int, float], b: dict[int, float], steps) -> float:
    return max((abs(a[s] - b[s]) for s in steps if s in a and s in b), default=math.nan)


def add_row(out: str, row: dict) -> None:
    """Append ``row`` to RESULTS/bench_pretrain.json (each phase is its own process)."""
    path = Path(out) / f"{RESULT}.json"
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    config = {
        "baseline": "the uninterrupted run (resume); the bf16 run's first steps (fp32)",
        "target": "losses after a SIGTERM resume equal the uninterrupted run's (within its run-to-run noise)",
    }
    write_results(RESULT, [*rows, row], config, out, COLUMNS)


def phase_e2e(args, sizes: dict) -> dict:
    """Uninterrupted run; the same run stopped by SIGTERM and resumed; the two loss curves."""
    data = shards(args.work, sizes)
    ds = str(ROOT / "deepspeed_configs" / "zero2.json")
    full, cut = args.work / "e2e_full", args.work / "e2e_resumed"
    command = {d: pretrain_cmd(ds, overrides(d, data, sizes, sizes["precision"], sizes["steps"])) for d in (full, cut)}
    seconds = run(command[full])
    first = run(command[cut], stop_after=sizes["stop"], run_dir=cut)
    stopped = max(losses(cut), default=0)
    run(command[cut])  # resumes from the checkpoint the SIGTERM saved
    a, b = losses(full), losses(cut)
    before = max_diff(a, b, range(1, stopped + 1))
    after = max_diff(a, b, range(stopped + 1, sizes["steps"] + 1))
    val = [r for r in rows_of(full) if r["split"] == "val"]
    export = full / "export"
    exported = (export / "config.json").is_file() and (export / "model.safetensors").is_file()
    equal = after == 0 or (math.isfinite(after) and after <= NOISE_FACTOR * before)
    good = equal and exported and bool(val) and all(math.isfinite(v) for v in a.values())
    last = train_rows(full).get(max(a, default=0), {})
    return {
        "phase": "e2e",
        "precision": sizes["precision"],
        "zero": 2,
        "backend": sizes["backend"],
        "image": "x".join(map(str, sizes["image"])),
        "steps": len(a),
        "seconds": seconds,
        "seconds_to_stop": first,
        "stopped_at": stopped,
        "first_loss": a.get(1),
        "last_loss": a.get(max(a, default=0)),
        "losses": [a[s] for s in sorted(a)],
        "max_diff_before_stop": before,
        "max_diff_after_resume": after,
        "samples_per_s": last.get("samples_per_s"),
        "peak_mem_gib": last.get("peak_mem_gib"),
        "val": val[-1] if val else None,
        "exported": exported,
        "check": f"resumed at {stopped}: max |loss diff| after {after:.3g} (before the stop {before:.3g}); "
        f"eval {'yes' if val else 'NO'}; export {'yes' if exported else 'NO'}",
        "verdict": "ok" if good else "FAILED",
    }


def phase_fp32(args, sizes: dict) -> dict:
    """The first 10 steps again in fp32: how far bf16's curve lies from it."""
    steps = min(10, sizes["steps"])
    data, run_dir = shards(args.work, sizes), args.work / "fp32"
    cmd = pretrain_cmd(str(ROOT / "deepspeed_configs" / "zero2.json"), overrides(run_dir, data, sizes, "fp32", steps))
    seconds = run(cmd + ["train.export=false"])
    ref = losses(run_dir)
    path = Path(args.out) / f"{RESULT}.json"
    earlier = json.loads(path.read_text())["rows"] if path.is_file() else []
    bf16 = next((r for r in earlier if r["phase"] == "e2e" and "losses" in r), None)
    low = dict(enumerate(bf16["losses"], start=1)) if bf16 else {}
    rel = max((abs(low[s] - ref[s]) / abs(ref[s]) for s in ref if s in low), default=math.nan)
    good = all(math.isfinite(v) for v in ref.values()) and len(ref) == steps
    return {
        "phase": "fp32",
        "precision": "fp32",
        "zero": 2,
        "steps": len(ref),
        "seconds": seconds,
        "first_loss": ref.get(1),
        "last_loss": ref.get(steps),
        "losses": [ref[s] for s in sorted(ref)],
        "max_rel_diff_vs_e2e": rel,
        "check": f"e2e's {sizes['precision']} losses vs fp32 over {steps} steps: max relative diff {rel:.3g}",
        "verdict": "ok" if good else "FAILED",
    }


def phase_smoke(args, sizes: dict, name: str, ds_file: str, precision: str) -> dict:
    """A few steps through one DeepSpeed config: finite losses (and fp16's loss scale)."""
    steps = 4
    data, run_dir = shards(args.work, sizes), args.work / name
    cmd = pretrain_cmd(str(ROOT / "deepspeed_configs" / ds_file), overrides(run_dir, data, sizes, precision, steps))
    seconds = run(cmd + ["train.export=false", "data.val_shards=null"])
    rows = train_rows(run_dir)
    finite = len(rows) == steps and all(math.isfinite(r["loss"]) for r in rows.values())
    last = rows.get(steps, {})
    return {
        "phase": name,
        "precision": precision,
        "zero": json.loads((ROOT / "deepspeed_configs" / ds_file).read_text())["zero_optimization"]["stage"],
        "steps": len(rows),
        "seconds": seconds,
        "first_loss": rows.get(1, {}).get("loss"),
        "last_loss": last.get("loss"),
        "loss_scale": last.get("loss_scale"),
        "skipped": last.get("nonfinite_skipped"),
        "peak_mem_gib": last.get("peak_mem_gib"),
        "check": f"{len(rows)} of {steps} steps logged, losses finite: {finite}, loss scale {last.get('loss_scale')}",
        "verdict": "ok" if finite else "FAILED",
    }


PHASES = {
    "e2e": phase_e2e,
    "fp32": phase_fp32,
    "zero3": lambda args, sizes: phase_smoke(args, sizes, "zero3", "zero3.json", sizes["precision"]),
    "fp16": lambda args, sizes: phase_smoke(args, sizes, "fp16", "zero2_fp16.json", "fp16"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("phase", choices=list(PHASES))
    parser.add_argument("--work", type=Path, required=True, help="shards and run folders (large: keep out of --out)")
    parser.add_argument("--out", required=True, help="results folder (bench_pretrain.json)")
    parser.add_argument("--cpu", action="store_true", help="CPU sizes: pil decode, 64x128, fp32, 6 steps")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    # `timeout` sends SIGTERM: end as an exception, so run()'s cleanup stops the trainer's session
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(f"gpu_pretrain {args.phase}: stopped by SIGTERM (time limit)"))
    sizes = CPU if args.cpu else GPU
    try:
        row = PHASES[args.phase](args, sizes)
    except RuntimeError as err:
        row = {"phase": args.phase, "check": str(err), "verdict": "FAILED"}
    add_row(args.out, row)
    print(f"{args.phase}: {row['verdict']}: {row['check']}", flush=True)
    return 0 if row["verdict"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
