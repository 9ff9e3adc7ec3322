"""Whole pre-training steps through a real DeepSpeed engine: samples/s, TFLOP/s per GPU,
MFU, peak memory and the share of the step spent waiting for data, for each
preset x ZeRO stage x precision x micro-batch x pixel sampling (on: 100 pixels, off: all).

    python -m benchmarks.bench_step                      # GPU: pixelbert-r50, bf16, ZeRO 1/2/3
    python -m benchmarks.bench_step --quick              # the CPU smoke run (tiny preset)
    python -m benchmarks.bench_step --presets pixelbert-r50 --zero 2 --precision bf16 \\
        --micro-batch 8 16 --sampling on off --image 800 1333
    deepspeed --num_gpus 8 --module benchmarks.bench_step ...  # several GPUs: per-GPU figures

Each step is the Trainer's: ``engine(batch)``, ``engine.backward(loss)``, ``engine.step()``
over ``build_model(preset)`` with the hybrid SGD/AdamW optimiser and the DeepSpeed JSON of
the stage, filled as the trainer fills it. Batches are synthetic and in memory (so the data
wait is the host-to-device copy only) unless ``--shards DIR`` reads real shards through
the project's loader. FLOPs per sample come from ``training_flops_per_sample`` (counted on
the meta device at the padded image size); MFU divides by the GPU's dense peak.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import math
import time
from statistics import median
from typing import TYPE_CHECKING

from benchmarks.common import ROOT, spread, sync, write_results
from pixelbert_dist.train.run import close_started_group

if TYPE_CHECKING:  # torch is imported where it is used: --help answers without it
    import torch

COLUMNS = [
    "preset",
    "zero",
    "precision",
    "micro_batch",
    "sampling",
    "image",
    "step_ms",
    "step_spread",
    "samples_per_s",
    "tflops_per_gpu",
    "mfu",
    "peak_mem_gib",
    "data_wait",
    "loss",
    "status",
]
IMAGE = {"tiny": (192, 256), "pixelbert-r50": (800, 1333), "pixelbert-x152": (600, 1000)}
PRECISIONS = ("bf16", "fp16", "fp32")


def dtype_of(precision: str) -> torch.dtype:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def padded(hw: tuple[int, int]) -> tuple[int, int]:
    return tuple(math.ceil(x / 64) * 64 for x in hw)


def synthetic_batch(batch: int, hw: tuple[int, int], text_len: int, vocab: int, seed: int) -> dict:
    """A batch of the data contract: full-size images, captions of mixed length, 15% MLM
    on the matching pairs, half the pairs ITM negatives."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, text_len), generator=gen)
    lengths = torch.randint(text_len // 2, text_len + 1, (batch,), generator=gen)
    attention = (torch.arange(text_len) < lengths[:, None]).long()
    itm = torch.arange(batch) % 2
    chosen = (torch.rand(batch, text_len, generator=gen) < 0.15) & attention.bool() & (itm[:, None] == 1)
    height, width = padded(hw)
    return {
        "images": torch.randn(batch, 3, height, width, generator=gen),
        "image_sizes": torch.tensor([list(hw)] * batch),
        "input_ids": ids * attention,
        "attention_mask": attention,
        "token_type_ids": torch.zeros_like(ids),
        "mlm_labels": torch.where(chosen, ids, -100),
        "itm_labels": itm,
        "keys": [f"synthetic{seed}_{i}" for i in range(batch)],
    }


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    import torch

    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            value = value.to(device, non_blocking=True)
            value = value.to(dtype) if value.is_floating_point() else value
        out[key] = value
    return out


def batches(args, micro: int, hw, vocab: int, rank: int, world: int, device):
    """An endless iterator of host batches: two synthetic ones cycled, or real shards."""
    if not args.shards:
        return itertools.cycle([synthetic_batch(micro, hw, args.text_len, vocab, s) for s in (0, 1)])
    from pixelbert_dist.data.config import DataConfig
    from pixelbert_dist.data.loader import build_loader

    cfg = DataConfig(
        train_shards=args.shards,
        backend=args.backend,
        image_shorter=hw[0],
        image_max=hw[1],
        max_text_len=args.text_len,
        num_workers=args.workers,
    )
    loader = build_loader(cfg, args.shards, micro, rank, world, device)

    def forever():
        for epoch in itertools.count():
            loader.set_epoch(epoch)
            yield from loader

    return forever()


def build_engine(preset: str, stage: int, precision: str, micro: int, sampling: bool, world: int):
    import deepspeed
    import torch

    from pixelbert_dist.distributed.ds_config import fill_deepspeed_config, precision_of
    from pixelbert_dist.model import build_model
    from pixelbert_dist.train.optim import build_optimizer
    from pixelbert_dist.train.config import OptimConfig

    overrides = {} if sampling else {"pixel_sample_size": 0}
    if preset != "tiny":
        overrides["pixel_sample_size"] = 100 if sampling else 0
    torch.manual_seed(0)
    model = build_model(preset, **overrides)
    ds = fill_deepspeed_config(
        ROOT / "deepspeed_configs" / f"zero{stage}.json",
        micro_batch=micro,
        grad_accum=1,
        world_size=world,
        grad_clip=1.0,
        precision=precision,
    )
    ds["steps_per_print"] = 10**9
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, OptimConfig()), config=ds)
    return engine, precision_of(ds)


class Run:
    """One config's engine, batches and timings, so that several configs can take turns."""

    def __init__(self, args, preset, stage, precision, micro, sampling, world, rank, device):
        from pixelbert_dist.model import preset_config, training_flops_per_sample

        hw = tuple(args.image) if args.image else IMAGE[preset]
        self.row = {
            "preset": preset,
            "zero": stage,
            "precision": precision,
            "micro_batch": micro,
            "sampling": "on" if sampling else "off",
            "image": f"{hw[0]}x{hw[1]}",
            "world": world,
        }
        cfg = preset_config(preset)
        self.flops = training_flops_per_sample(cfg, padded(hw), args.text_len, cfg.pixel_sample_size if sampling else 0)
        self.device, self.step_times, self.data_times, self.loss = device, [], [], float("nan")
        self.engine, used = build_engine(preset, stage, precision, micro, sampling, world)
        self.row["precision"], self.dtype = used, dtype_of(used)  # a CPU without bf16/fp16 falls back
        self.source = batches(args, micro, hw, cfg.vocab_size, rank, world, device)

    def steps(self, count: int, timed: bool) -> None:
        for _ in range(count):
            sync(self.device)
            start = time.perf_counter()
            batch = to_device(next(self.source), self.device, self.dtype)  # as the Trainer casts
            sync(self.device)
            fetched = time.perf_counter()
            out = self.engine(batch)
            self.engine.backward(out["loss"])
            self.engine.step()
            sync(self.device)
            if timed:
                self.step_times.append(time.perf_counter() - start)
                self.data_times.append(fetched - start)
            self.loss = out["loss"].detach().float().item()

    def close(self) -> None:
        if self.engine is not None and hasattr(self.engine, "destroy"):
            self.engine.destroy()
        self.engine = None
        gc.collect()
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()

    def result(self, peak_gib: float | None) -> dict:
        from pixelbert_dist.metrics import peak_tflops

        row, micro = self.row, self.row["micro_batch"]
        stats = spread(self.step_times)
        step_s = stats["median"]
        tflops = self.flops * micro / step_s / 1e12
        peak = peak_tflops(row["precision"], self.device)
        row.update(
            step_ms=step_s * 1e3,
            step_ms_min=stats["min"] * 1e3,
            step_ms_max=stats["max"] * 1e3,
            step_spread=stats["spread"],
            steps_timed=stats["n"],
            samples_per_s=micro * row["world"] / step_s,
            tflops_per_gpu=tflops,
            mfu=tflops / peak if peak else None,
            peak_mem_gib=peak_gib,
            data_wait=sum(self.data_times) / sum(self.step_times),
            loss=self.loss,
            flops_per_sample=self.flops,
            params=sum(p.numel() for p in build_params(row["preset"])),
            status="ok" if math.isfinite(self.loss) else "non-finite loss",
        )
        return row


def run_configs(args, configs: list[tuple], world: int, rank: int, device, on_row=None) -> list[dict]:
    """Each config's steps; with ``--rounds R > 1`` all engines stay alive and take turns,
    ``steps / R`` timed steps each per round (interleaved: load on a shared machine hits
    every config alike; peak memory is then the process's, not one config's). ``on_row``
    gets the rows so far after each config that runs alone."""
    from pixelbert_dist.metrics import peak_memory_gib

    if args.rounds <= 1:
        rows = []
        for config in configs:
            rows.append(run_one(args, config, world, rank, device))
            if on_row:
                on_row(rows)
        return rows
    runs = [Run(args, *config, world, rank, device) for config in configs]
    for run in runs:
        run.steps(args.warmup, timed=False)
    per_round = max(1, args.steps // args.rounds)
    for _ in range(args.rounds):
        for run in runs:
            run.steps(per_round, timed=True)
    rows = [run.result(None) for run in runs]
    for run in runs:
        run.close()
    for row in rows:
        row["process_peak_mem_gib"] = peak_memory_gib(device)
    return rows


def run_one(args, config: tuple, world: int, rank: int, device) -> dict:
    import torch

    from pixelbert_dist.metrics import peak_memory_gib

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run = None
    try:
        run = Run(args, *config, world, rank, device)
        run.steps(args.warmup, timed=False)
        run.steps(args.steps, timed=True)
    except torch.cuda.OutOfMemoryError:
        preset, stage, precision, micro, sampling = config
        return {
            "preset": preset,
            "zero": stage,
            "precision": precision,
            "micro_batch": micro,
            "sampling": "on" if sampling else "off",
            "status": "oom",
        }
    finally:
        if run is not None:
            run.close()
    return run.result(peak_memory_gib(device))


def build_params(preset: str):
    from pixelbert_dist.model import build_model

    return build_model(preset, device="meta").parameters()


# -- --overhead: the Trainer's step against a bare DeepSpeed loop ------------------------
OVERHEAD_IMAGE = {"tiny": (64, 128), "pixelbert-r50": (128, 192)}  # small: CPU-sized steps
OVERHEAD_COLUMNS = [
    "preset",
    "image",
    "micro_batch",
    "steps",
    "repeats",
    "bare_ms",
    "trainer_ms",
    "overhead",
    "overhead_min",
    "overhead_max",
    "overhead_best",
    "framework_ms",
    "framework_share",
    "trainer_syncs",
    "bare_syncs",
    "health_ms",
    "health_share",
    "target_met",
]


class EngineClock:
    """Seconds spent inside the engine's forward, backward and step (wrapped on the
    instance): what a loop spends outside them is its own host work, measured inside the
    same step, so the machine's drift between repeats cancels. On a CPU the engine's calls
    are synchronous and this splits compute from framework time; on a GPU (asynchronous
    kernels) it would split launch time only."""

    PHASES = ("forward", "backward", "step")

    def __init__(self, engine):
        self.phases = dict.fromkeys(self.PHASES, 0.0)
        for name in self.PHASES:
            setattr(engine, name, self._timed(name, getattr(engine, name)))

    @property
    def seconds(self) -> float:
        return sum(self.phases.values())

    def reset(self) -> None:
        self.phases = dict.fromkeys(self.PHASES, 0.0)

    def _timed(self, name, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.phases[name] += time.perf_counter() - start

        return timed


class HealthClock:
    """Seconds the trainer spends in its run-health calls (``train/health.py``: the hang
    watchdog's per-step report, the collectives' timeout switch, and the straggler
    all-gather at each log step), wrapped on the instance like ``EngineClock``. The
    watchdog's and the heartbeat's own threads wake every few seconds and are not in it."""

    CALLS = ("step_done", "straggler_values")

    def __init__(self, health):
        self.seconds = 0.0
        for name in self.CALLS:
            setattr(health, name, self._timed(getattr(health, name)))

    def _timed(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


def overhead(args) -> list[dict]:
    """Per preset: one real pre-training Trainer (its engine, model, loader, logger); N of
    its host batches kept in memory; then, interleaved (the order flips every repeat), the
    Trainer's own hot loop (``train_micro_batch`` + ``finish_step``: device copy, NaN/inf
    window check, metric sums, meter, logging every ``train.log_every``) and a bare
    ``engine(batch); engine.backward(loss); engine.step()`` over the same batches and the
    same engine. Overhead = trainer / bare step time - 1, median over repeats of the
    paired ratios (and their spread); ``overhead_best`` compares each loop's fastest repeat,
    the estimate least touched by other processes (timeit's rule). ``framework_ms``: the
    time per step each loop spends outside the engine's forward/backward/step
    (``EngineClock``), trainer minus bare, medians over repeats; ``framework_share`` is
    that over the bare step: a drift-free estimate where steps take seconds (CPU only).
    ``trainer_syncs`` / ``bare_syncs``: host syncs per optimizer step of one more,
    untimed pass of each loop (``HostSyncs``: on a GPU torch's sync debug mode, on a CPU
    the calls that would sync), with the lines they come from (``sync_sites_*``); the
    bare loop's are the engine's own."""
    import tempfile

    from benchmarks.host_syncs import HostSyncs
    from pixelbert_dist.config import load_config
    from pixelbert_dist.console import Progress
    from pixelbert_dist.data.builders.synthetic import build_synthetic
    from pixelbert_dist.train.config import RunConfig
    from pixelbert_dist.train.trainer import Trainer

    rows, result_name = [], "bench_step_overhead_" + "_".join(args.presets)
    with tempfile.TemporaryDirectory() as tmp:
        enough = int(args.steps * max(args.micro_batch) / 0.8) + 20  # 80% train: a batch per step
        shards = build_synthetic(
            tmp, enough, seed=0, val_fraction=0.2, min_size=64, max_size=128, samples_per_shard=16, progress=False
        )["train"].directory
        for i, preset in enumerate(args.presets):  # --micro-batch: one per preset, or one for all
            hw = tuple(args.image) if args.image else OVERHEAD_IMAGE.get(preset, (128, 192))
            micro = args.micro_batch[min(i, len(args.micro_batch) - 1)]
            cfg = load_config(
                RunConfig,
                None,
                [
                    f"run_dir={tmp}/run_{preset}",
                    f"data.train_shards={shards}",
                    "data.val_shards=null",
                    "data.backend=pil",
                    "data.num_workers=0",
                    f"data.image_shorter={hw[0]}",
                    f"data.image_max={hw[1]}",
                    f"model.preset={preset}",
                    f"train.micro_batch={micro}",
                    f"train.precision={args.precision[0]}",
                    "train.max_steps=1000000",
                    "train.save_every=0",
                    "train.export=false",
                    "train.resume=none",
                ],
            )
            trainer = Trainer(cfg, ROOT / "deepspeed_configs" / f"zero{args.zero[0]}.json")
            loader = iter(trainer.train_loader)
            batches = [next(loader) for _ in range(args.steps)]
            dtype, device, engine = trainer.dtype, trainer.device, trainer.engine
            bar = Progress(preset, 10**6, 0, enabled=False)

            def trainer_loop(batches=batches, trainer=trainer, bar=bar):  # this config's, bound now
                for batch in batches:
                    if trainer.train_micro_batch(batch):
                        trainer.finish_step(bar)

            def bare_loop(batches=batches, engine=engine, device=device, dtype=dtype):
                for batch in batches:
                    out = engine(to_device(batch, device, dtype))
                    engine.backward(out["loss"])
                    engine.step()

            loops = {"trainer": trainer_loop, "bare": bare_loop}
            times, outside, clock = {name: [] for name in loops}, {name: [] for name in loops}, EngineClock(engine)
            health, health_ms = HealthClock(trainer.health), []
            phases = {name: {phase: [] for phase in EngineClock.PHASES} for name in loops}
            for repeat in range(1 + args.repeats):  # the first pass of each: warm-up (FLOPs count, allocator)
                for name in ("trainer", "bare") if repeat % 2 == 0 else ("bare", "trainer"):
                    sync(device)
                    clock.reset()
                    health.seconds = 0.0
                    start = time.perf_counter()
                    loops[name]()
                    sync(device)
                    if repeat >= 1 and name == "trainer":
                        health_ms.append(health.seconds / len(batches) * 1e3)
                    if repeat >= 1:
                        elapsed = time.perf_counter() - start
                        times[name].append(elapsed / len(batches))
                        outside[name].append((elapsed - clock.seconds) / len(batches))
                        for phase, seconds in clock.phases.items():
                            phases[name][phase].append(seconds / len(batches) * 1e3)
            syncs = {}
            for name, loop in loops.items():
                with HostSyncs(device) as syncs[name]:
                    loop()
                sync(device)
            optimizer_steps = len(batches) / engine.gradient_accumulation_steps()
            ratios = [t / b - 1 for t, b in zip(times["trainer"], times["bare"])]
            framework = median(outside["trainer"]) - median(outside["bare"])
            rows.append(
                {
                    "preset": preset,
                    "image": f"{hw[0]}x{hw[1]}",
                    "micro_batch": micro,
                    "steps": len(batches),
                    "repeats": args.repeats,
                    "bare_ms": median(times["bare"]) * 1e3,
                    "trainer_ms": median(times["trainer"]) * 1e3,
                    "overhead": median(ratios),
                    "overhead_min": min(ratios),
                    "overhead_max": max(ratios),
                    "overhead_best": min(times["trainer"]) / min(times["bare"]) - 1,
                    "framework_ms": framework * 1e3,
                    "framework_share": framework / median(times["bare"]),
                    "trainer_syncs": len(syncs["trainer"].calls) / optimizer_steps,
                    "bare_syncs": len(syncs["bare"].calls) / optimizer_steps,
                    "health_ms": median(health_ms),
                    "health_share": median(health_ms) / 1e3 / median(times["bare"]),
                    "sync_sites_trainer": syncs["trainer"].sites(),
                    "sync_sites_bare": syncs["bare"].sites(),
                    "sync_method": "cuda sync debug mode" if device.type == "cuda" else "calls that sync a GPU",
                    "target_met": "yes" if median(ratios) <= 0.03 else "no",
                    "outside_ms_trainer": [t * 1e3 for t in outside["trainer"]],
                    "outside_ms_bare": [t * 1e3 for t in outside["bare"]],
                    "engine_phase_ms": phases,  # per loop, per phase, per repeat
                    "bare_ms_all": [t * 1e3 for t in times["bare"]],
                    "trainer_ms_all": [t * 1e3 for t in times["trainer"]],
                }
            )
            print(
                f"{preset}: bare {rows[-1]['bare_ms']:.1f} ms/step, trainer {rows[-1]['trainer_ms']:.1f} ms/step, "
                f"overhead {median(ratios):+.2%} (paired, {min(ratios):+.2%} .. {max(ratios):+.2%}; "
                f"fastest repeats {rows[-1]['overhead_best']:+.2%}); outside the engine: "
                f"{framework * 1e3:+.2f} ms/step = {rows[-1]['framework_share']:+.3%} of the bare step; "
                f"host syncs per optimizer step: trainer {rows[-1]['trainer_syncs']:.2f}, "
                f"bare {rows[-1]['bare_syncs']:.2f} ({rows[-1]['sync_method']}); run health (watchdog, "
                f"timeouts, straggler gather): {rows[-1]['health_ms']:.4f} ms/step = "
                f"{rows[-1]['health_share']:.4%} of the bare step",
                flush=True,
            )
            for name in loops:
                print(f"  {name} loop's syncs by line (most): {syncs[name].sites(8)}", flush=True)
            trainer.logger.close()
            if hasattr(engine, "destroy"):
                engine.destroy()
            if len(rows) < len(args.presets):  # the rows so far, should a time limit stop the next preset
                write_results(result_name, rows, _overhead_config(args, cfg), args.out, OVERHEAD_COLUMNS, partial=True)
    write_results(result_name, rows, _overhead_config(args, cfg), args.out, OVERHEAD_COLUMNS)
    return rows


def _overhead_config(args, cfg) -> dict:
    return {
        "mode": "overhead",
        "zero": args.zero[0],
        "precision": args.precision[0],
        "target": "overhead <= 3%",
        "log_every": cfg.train.log_every,
        "compared": "Trainer.train_micro_batch + finish_step vs bare "
        "engine(batch); engine.backward(loss); engine.step(), same engine and batches, interleaved repeats",
    }


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a handful of steps per config")
    parser.add_argument("--presets", nargs="+", default=None, help="default: pixelbert-r50 on a GPU, else tiny")
    parser.add_argument("--zero", nargs="+", type=int, default=None, choices=[0, 1, 2, 3])
    parser.add_argument(
        "--precision", nargs="+", default=None, choices=PRECISIONS, help="default: bf16 on a GPU, else fp32"
    )
    parser.add_argument("--micro-batch", nargs="+", type=int, default=None)
    parser.add_argument("--sampling", nargs="+", default=["on", "off"], choices=["on", "off"])
    parser.add_argument(
        "--image",
        nargs=2,
        type=int,
        default=None,
        metavar=("SHORTER", "LONGER"),
        help="image size before padding (default: the preset's paper size)",
    )
    parser.add_argument("--text-len", type=int, default=40)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per config")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="interleave the configs over this many rounds (default: 1; --quick: the step count)",
    )
    parser.add_argument("--shards", default=None, help="read real shards instead of synthetic batches")
    parser.add_argument("--backend", default=None, help="--shards' decoder (default: nvjpeg on a GPU, else dali)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=None, help="results folder")
    parser.add_argument(
        "--overhead",
        action="store_true",
        help="the Trainer's step against a bare engine loop (same engine, batches; interleaved)",
    )
    parser.add_argument("--repeats", type=int, default=7, help="--overhead: timed repeats of each loop")
    args = parser.parse_args(argv)
    import torch  # after parsing: --help answers without torch

    gpu = torch.cuda.is_available()
    args.presets = args.presets or ["pixelbert-r50" if gpu else "tiny"]
    args.precision = args.precision or ["bf16" if gpu else "fp32"]
    args.backend = args.backend or ("dali" if not gpu else "nvjpeg")
    args.zero = args.zero or [1, 2, 3]
    args.micro_batch = args.micro_batch or ([2] if not gpu else [8] if args.quick else [8, 16])
    args.steps = args.steps or (5 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    args.rounds = args.rounds or (args.steps if args.quick else 1)
    return args


def main(argv=None) -> list[dict]:
    args = parse(argv)
    import torch.distributed as dist

    from pixelbert_dist.distributed.env import device_for, init_distributed
    from pixelbert_dist.metrics import peak_tflops

    if args.overhead:
        return overhead(args)
    env = init_distributed()
    device, world, rank = device_for(env), dist.get_world_size(), dist.get_rank()
    rows = []
    configs = [
        (preset, stage, precision, micro, sampling == "on")
        for preset, stage, precision, micro, sampling in itertools.product(
            args.presets, args.zero, args.precision, args.micro_batch, args.sampling
        )
    ]
    config = {k: v for k, v in vars(args).items() if k != "out"}
    config.update(
        device=str(device),
        world_size=world,
        baseline="the GPU's dense peak (MFU); the configs against each other (interleaved when rounds > 1)",
        target="pixelbert-r50 bf16 >= 40% MFU on an H100/H200",
        peak_tflops=peak_tflops(args.precision[0], device),
    )

    def partial(done: list[dict]) -> None:
        if rank == 0:
            write_results("bench_step", done, config, args.out, COLUMNS, partial=True)

    rows += run_configs(args, configs, world, rank, device, on_row=partial)
    if rank == 0:
        write_results("bench_step", rows, config, args.out, COLUMNS)
    return rows


if __name__ == "__main__":
    main()
    close_started_group()
