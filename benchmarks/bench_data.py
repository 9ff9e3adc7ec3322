"""Images/s of each available image backend at the paper's sizes and a small size,
with and without aspect-ratio bucketing, and the padding fraction of each.

    python -m benchmarks.bench_data --quick                # makes its own shards
    python -m benchmarks.bench_data --shards data/coco/train --batches 50 --batch-size 32

Without ``--shards`` it writes photo-like JPEGs (smooth gradients + noise, so they
decode about as slowly as photos, unlike flat synthetic shapes) at COCO-like sizes:
640x480, 480x640 and some 2:1 panoramas. Prints a markdown table and writes JSON with
the machine, versions and commit to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import results_dir
from pixelbert_dist.data.config import DataConfig
from pixelbert_dist.data.format.shards import ShardWriter

SIZES = {"paper": (800, 1333), "small": (256, 427)}
SHAPES = [(480, 640), (640, 480), (480, 640), (320, 640)]  # (h, w): mostly landscape, as COCO


def photo_like_jpeg(height: int, width: int, rng: np.random.Generator) -> bytes:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, (x + y) / (width + height)], -1) * 200 + 20
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_shards(directory: Path, num: int, seed: int = 0, per_shard: int = 256, jpeg=photo_like_jpeg) -> Path:
    """``num`` samples at COCO-like sizes; ``jpeg(height, width, rng)`` makes each image."""
    rng = np.random.default_rng(seed)
    with ShardWriter(directory, "bench", samples_per_shard=per_shard, source="bench") as writer:
        for i in range(num):
            height, width = SHAPES[int(rng.integers(len(SHAPES)))]
            writer.write(
                f"bench{i:06d}",
                jpeg(height, width, rng),
                {
                    "key": f"bench{i:06d}",
                    "captions": [f"a gradient picture number {i}"],
                    "image_id": str(i),
                    "width": width,
                    "height": height,
                    "source": "bench",
                },
            )
    return directory


def backends() -> list[tuple[str, str, str]]:
    """(label, data.backend, device) for what this machine can run."""
    import torch  # here, not at the top: --help answers without torch

    from pixelbert_dist.data.decode.dali import dali_available

    out = []
    if dali_available():
        out.append(("dali-cpu", "dali", "cpu"))
    out.append(("pil", "pil", "cpu"))
    if torch.cuda.is_available():
        if dali_available():
            out.append(("dali-gpu", "dali", "cuda"))
        out.append(("nvjpeg", "nvjpeg", "cuda"))
    return out


def measure(
    shards: Path, backend: str, device: str, size: str, bucketing: bool, batches: int, batch_size: int, workers: int
) -> dict:
    import torch

    from pixelbert_dist.data.loader import build_loader

    shorter, longest = SIZES[size]
    cfg = DataConfig(
        backend=backend, image_shorter=shorter, image_max=longest, bucketing=bucketing, num_workers=workers, hflip=True
    )
    loader = build_loader(cfg, shards, batch_size, device=device)
    it = iter(loader)
    next(it)  # start-up: pipeline build, worker fork
    loader.valid_pixels = loader.total_pixels = 0
    images, start = 0, time.perf_counter()
    for _ in range(min(batches, len(loader) - 1)):
        batch = next(it)
        images += batch["images"].shape[0]
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del it
    return {
        "backend": backend,
        "label": None,
        "device": device,
        "size": size,
        "shorter": shorter,
        "max": longest,
        "bucketing": bucketing,
        "images": images,
        "seconds": round(seconds, 3),
        "images_per_s": round(images / seconds, 1),
        "padding_fraction": round(loader.padding_fraction, 4),
    }


def machine() -> dict:
    import nvidia.dali
    import torch

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "dali": nvidia.dali.__version__,
        "commit": commit,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", help="split directory (default: make photo-like shards)")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="DALI threads / PIL workers")
    parser.add_argument("--quick", action="store_true", help="4 batches of 4 (a smoke run)")
    parser.add_argument("--out", help="JSON file (default: bench_data.json in a new results folder)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.batch_size = 4, 4
    with tempfile.TemporaryDirectory() as tmp:
        shards = (
            Path(args.shards)
            if args.shards
            else make_shards(Path(tmp) / "bench", (args.batches + 1) * args.batch_size * 2)
        )
        rows = []
        for label, backend, device in backends():
            for size in SIZES:
                for bucketing in (False, True):
                    row = measure(shards, backend, device, size, bucketing, args.batches, args.batch_size, args.workers)
                    row["label"] = label
                    rows.append(row)
                    print(
                        f"| {label:9s} | {size:5s} {row['shorter']}/{row['max']} | "
                        f"bucketing {'on ' if bucketing else 'off'} | "
                        f"{row['images_per_s']:7.1f} img/s | padding {row['padding_fraction']:.3f} |",
                        flush=True,
                    )
    result = {
        "machine": machine(),
        "batch_size": args.batch_size,
        "batches": args.batches,
        "workers": args.workers,
        "shards": args.shards or "photo-like synthetic",
        "rows": rows,
    }
    out = Path(args.out) if args.out else results_dir() / "bench_data.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
