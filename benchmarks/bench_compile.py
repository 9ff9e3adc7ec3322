"""torch.compile against eager: the Trainer's step (``engine(batch)``, ``engine.backward``,
``engine.step``) through two DeepSpeed engines over the same model, one compiled with
``engine.compile()`` as ``train.compile=true`` does, timed in one process with
interleaved repeats (eager, compiled, eager, compiled, ...) so shared-machine load hits
both alike.

    python -m benchmarks.bench_compile                           # tiny, CPU
    python -m benchmarks.bench_compile --presets tiny pixelbert-r50 --image 128 128
    python -m benchmarks.bench_compile --presets pixelbert-r50 --precision bf16 --micro-batch 8   # GPU

The first compiled step (tracing + code generation) is reported apart as ``compile_s``;
the verdict says "compile wins" only when the compiled median beats eager's by more than
the larger of the two spreads.
"""

from __future__ import annotations

import argparse
import itertools
import time
from typing import TYPE_CHECKING

from benchmarks.bench_step import IMAGE, PRECISIONS, build_engine, dtype_of, synthetic_batch, to_device
from benchmarks.common import interleaved, spread, time_fn, write_results
from pixelbert_dist.train.run import close_started_group

if TYPE_CHECKING:  # torch is imported where it is used: --help answers without it
    import torch

COLUMNS = [
    "preset",
    "precision",
    "micro_batch",
    "image",
    "eager_ms",
    "eager_spread",
    "compiled_ms",
    "compiled_spread",
    "speedup",
    "compile_s",
    "verdict",
]


def step_fn(engine, source, device, dtype):
    def step():
        out = engine(to_device(next(source), device, dtype))
        engine.backward(out["loss"])
        engine.step()
        return out["loss"].detach()

    return step


def compare(args, preset: str, device: torch.device, report=lambda row: None) -> dict:
    """Eager against compiled; ``report`` gets the row as it fills (the eager steps, then
    the first compiled step's seconds): a cold compile can outlast a time limit."""
    from pixelbert_dist.model import preset_config

    hw = tuple(args.image) if args.image else IMAGE[preset]
    vocab = preset_config(preset).vocab_size
    source = itertools.cycle([synthetic_batch(args.micro_batch, hw, args.text_len, vocab, s) for s in (0, 1)])
    eager, used = build_engine(preset, args.zero, args.precision, args.micro_batch, True, 1)
    row = {"preset": preset, "precision": used, "micro_batch": args.micro_batch, "image": f"{hw[0]}x{hw[1]}"}
    fns = {"eager": step_fn(eager, source, device, dtype_of(used))}
    first = spread(time_fn(fns["eager"], device, warmup=1, iters=2))
    report({**row, "eager_ms": first["median"] * 1e3, "verdict": "compiling (eager: 2 steps alone)"})
    compiled, _ = build_engine(preset, args.zero, args.precision, args.micro_batch, True, 1)
    compiled.compile()
    fns["compiled"] = step_fn(compiled, source, device, dtype_of(used))
    start = time.perf_counter()
    fns["compiled"]()  # tracing and code generation happen here
    compile_s = time.perf_counter() - start
    report({**row, "eager_ms": first["median"] * 1e3, "compile_s": compile_s, "verdict": "compiled, timing"})
    times = interleaved(fns, device, warmup=args.warmup, repeats=args.repeats)
    e, c = spread(times["eager"]), spread(times["compiled"])
    speedup = e["median"] / c["median"]
    wins = speedup - 1 > max(e["spread"], c["spread"])
    loses = 1 - speedup > max(e["spread"], c["spread"])
    for engine in (eager, compiled):
        engine.destroy()
    return {
        **row,
        "eager_ms": e["median"] * 1e3,
        "eager_spread": e["spread"],
        "compiled_ms": c["median"] * 1e3,
        "compiled_spread": c["spread"],
        "speedup": speedup,
        "compile_s": compile_s,
        "repeats": args.repeats,
        "eager_all_ms": [t * 1e3 for t in times["eager"]],
        "compiled_all_ms": [t * 1e3 for t in times["compiled"]],
        "verdict": "compile wins" if wins else "compile loses" if loses else "no clear difference",
    }


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny"])
    parser.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3])
    parser.add_argument("--precision", default=None, choices=PRECISIONS, help="default: bf16 on a GPU, else fp32")
    parser.add_argument("--micro-batch", type=int, default=None, help="default: 8 on a GPU, else 2")
    parser.add_argument("--image", nargs=2, type=int, default=None, metavar=("SHORTER", "LONGER"))
    parser.add_argument("--text-len", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=7, help="timed steps of each variant, interleaved")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds after the compile step")
    parser.add_argument("--out", default=None, help="results folder")
    args = parser.parse_args(argv)
    import torch  # after parsing: --help answers without torch

    gpu = torch.cuda.is_available()
    args.precision = args.precision or ("bf16" if gpu else "fp32")
    args.micro_batch = args.micro_batch or (8 if gpu else 2)
    return args


def main(argv=None) -> list[dict]:
    args = parse(argv)
    from pixelbert_dist.distributed.env import device_for, init_distributed

    device = device_for(init_distributed())
    config = {k: v for k, v in vars(args).items() if k != "out"}
    config.update(
        baseline="eager step of the same model and batches, interleaved in one process",
        target="compiled median faster than eager by more than the spread (else keep train.compile off)",
    )
    rows = []
    for preset in args.presets:
        rows.append(
            compare(
                args,
                preset,
                device,
                lambda row: write_results("bench_compile", [*rows, row], config, args.out, COLUMNS, partial=True),
            )
        )
    write_results("bench_compile", rows, config, args.out, COLUMNS)
    return rows


if __name__ == "__main__":
    main()
    close_started_group()
