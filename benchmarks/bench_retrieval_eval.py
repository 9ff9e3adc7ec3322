"""Single-stream retrieval evaluation: measured pairs/s on this machine, and the projected
cost of Flickr30K 1K (1,000 x 5,000 pairs) and COCO 5K (5,000 x 25,010 pairs) from the
FLOP model (model/flops.py: retrieval_eval_flops) on 8 and 64 GPUs.

Every (image, caption) pair goes through the transformer with the image's pixel tokens
(the CNN runs once per image), exactly as RetrievalTask scores them, so the cost grows as
images x captions: 25x from Flickr30K 1K to COCO 5K.

    python benchmarks/bench_retrieval_eval.py [--preset tiny --image 64 --images 4 --texts 64] [--out DIR]
    python -m benchmarks.bench_retrieval_eval --ranks 1 2 [--images 8] [--out DIR]

``--ranks``: the same measurement under the real deepspeed launcher at each rank count,
one after the other, one thread per rank; each rank scores its share of the images (as
RetrievalTask splits them) and the pairs/s is all pairs over the slowest rank's time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import write_results
from pixelbert_dist.train.run import close_started_group

# torch and the model are imported in the functions that use them: --help answers without them

SETS = {"flickr30k_1k": (1000, 5000), "coco_5k": (5000, 25010)}
# the paper's image sizes per backbone (shorter side / longest side)
PAPER_SIZE = {"pixelbert-r50": (800, 1333), "pixelbert-x152": (600, 1000)}


def measure(preset: str, image: int, images: int, texts: int, text_len: int, text_batch: int, repeats: int) -> dict:
    """Median pairs/s of scoring ``images`` x ``texts`` pairs as RetrievalTask does."""
    import torch
    import torch.distributed as dist

    from pixelbert_dist.model import build_model
    from pixelbert_dist.model.flops import pair_forward_flops

    with torch.no_grad():
        torch.manual_seed(0)
        model = build_model(preset).eval()
        pics = torch.randn(images, 3, image, image)
        sizes = torch.tensor([[image, image]] * images)
        ids = torch.randint(5, model.config.vocab_size, (texts, text_len))
        text = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        seconds = []
        for _ in range(repeats + 1):  # the first pass warms up
            if world > 1:
                dist.barrier()
            start = time.perf_counter()
            pixels, mask = model.encode_pixels(pics[rank::world], sizes[rank::world])
            for i in range(pixels.shape[0]):
                for lo in range(0, texts, text_batch):
                    chunk = {k: v[lo : lo + text_batch] for k, v in text.items()}
                    n = chunk["input_ids"].shape[0]
                    model.itm_score(chunk, pixels[i : i + 1].expand(n, -1, -1), mask[i : i + 1].expand(n, -1))
            if world > 1:
                dist.barrier()  # the slowest rank's time
            seconds.append(time.perf_counter() - start)
        median = statistics.median(seconds[1:])
        pairs_per_s = images * texts / median
        flops = pair_forward_flops(model.config, (image, image), text_len)
        return {
            "preset": preset,
            "ranks": world,
            "image": f"{image}x{image}",
            "pairs": images * texts,
            "pairs_per_s": round(pairs_per_s, 1),
            "spread_pct": round(100 * (max(seconds[1:]) - min(seconds[1:])) / median, 1),
            "gflop_per_pair": round(flops / 1e9, 4),
            "achieved_gflop_s": round(pairs_per_s * flops / 1e9, 1),
        }


def projections(text_len: int, mfu: float, gpu: str = "H100", precision: str = "bf16") -> list[dict]:
    """Hours per test set for the paper's backbones on 8 and 64 GPUs at ``mfu``."""
    from pixelbert_dist.metrics import PEAK_TFLOPS
    from pixelbert_dist.model import preset_config
    from pixelbert_dist.model.flops import retrieval_eval_flops

    peak = PEAK_TFLOPS[gpu][precision] * 1e12
    rows = []
    for preset, hw in PAPER_SIZE.items():
        cfg = preset_config(preset)
        for name, (images, texts) in SETS.items():
            flops = retrieval_eval_flops(cfg, hw, text_len, images, texts)
            row = {"preset": preset, "set": name, "pairs": images * texts, "eflop": round(flops / 1e18, 3)}
            for gpus in (8, 64):
                row[f"minutes_{gpus}gpu"] = round(flops / (gpus * peak * mfu) / 60, 1)
            rows.append(row)
    return rows


def measure_over_ranks(args) -> list[dict]:
    """``measure`` under the deepspeed launcher at each of ``args.ranks`` rank counts."""
    from pixelbert_dist.distributed.env import free_port

    rows, work = [], Path(tempfile.mkdtemp(prefix="bench_retrieval_ranks_"))
    launcher = str(Path(sys.executable).parent / "deepspeed")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per rank: ranks are what scales
    for ranks in args.ranks:
        out = work / f"ranks{ranks}.json"
        command = [launcher, "--num_gpus", str(ranks), "--master_port", str(free_port())]
        command += ["--module", "benchmarks.bench_retrieval_eval", "--row-json", str(out)]
        command += [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in MEASURED]
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
        rows.append(json.loads(out.read_text()))
    return rows


MEASURED = ("preset", "image", "images", "texts", "text_len", "text_batch", "repeats")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--image", type=int, default=64, help="square image side for the measured model")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--text-len", type=int, default=40)
    parser.add_argument("--text-batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilisation assumed for the projection")
    parser.add_argument("--out", help="results folder (default: a new one under benchmarks/results)")
    parser.add_argument("--ranks", type=int, nargs="+", help="measure under the launcher at these rank counts")
    parser.add_argument("--row-json", help=argparse.SUPPRESS)  # a rank count's row, for --ranks
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = parser.parse_args(argv)
    if args.row_json:  # one launch of --ranks
        import torch.distributed as dist

        from pixelbert_dist.distributed.env import init_distributed

        init_distributed()
        row = measure(args.preset, args.image, args.images, args.texts, args.text_len, args.text_batch, args.repeats)
        if dist.get_rank() == 0:
            Path(args.row_json).write_text(json.dumps(row))
        return 0
    if args.ranks:
        config = {k: v for k, v in vars(args).items() if k in MEASURED or k == "ranks"}
        columns = ["preset", "ranks", "image", "pairs", "pairs_per_s", "spread_pct", "achieved_gflop_s"]
        write_results(
            "retrieval_eval_ranks", measure_over_ranks(args), {**config, "threads_per_rank": 1}, args.out, columns
        )
        return 0
    measured = measure(args.preset, args.image, args.images, args.texts, args.text_len, args.text_batch, args.repeats)
    for name, (images, texts) in SETS.items():  # this model and machine, one rank
        measured[f"hours_{name}"] = round(images * texts / measured["pairs_per_s"] / 3600, 1)
    config = {k: v for k, v in vars(args).items() if k != "out"}
    columns = [
        "preset",
        "image",
        "pairs",
        "pairs_per_s",
        "spread_pct",
        "achieved_gflop_s",
        *(f"hours_{n}" for n in SETS),
    ]
    write_results("retrieval_eval_measured", [measured], config, args.out, columns)
    rows = projections(args.text_len, args.mfu)
    from pixelbert_dist.metrics import PEAK_TFLOPS

    config = {**config, "gpu": "H100 SXM", "precision": "bf16", "peak_tflops": PEAK_TFLOPS["H100"]["bf16"]}
    columns = ["preset", "set", "pairs", "eflop", "minutes_8gpu", "minutes_64gpu"]
    write_results("retrieval_eval_projection", rows, config, args.out, columns)
    return 0


if __name__ == "__main__":
    code = main()
    close_started_group()
    sys.exit(code)
