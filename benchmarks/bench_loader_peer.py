"""The PIL loader and DALI-CPU against an OpenCLIP-style peer, on the same shards and the
same work: decode, resize (shorter side 800, longer <= 1333), flip half, normalise, pad
to x64, a float32 [B,3,H,W] batch in the calling process.

    python -m benchmarks.bench_loader_peer --repeats 5 --batches 10
    python -m benchmarks.bench_loader_peer --baseline /path/to/older/checkout  # + its pil
    python -m benchmarks.bench_loader_peer --baseline OLD --baseline-contenders dali-cpu

The peer is written here the way OpenCLIP feeds webdataset shards: ``webdataset``
decodes to PIL in DataLoader workers, torchvision transforms resize, flip, convert and
normalise each image there, a collate function pads the batch, and the float batch
crosses to the main process through shared memory. (OpenCLIP crops to a square; the
padded-batch rule is this project's, given to the peer so both do the same work.)

Two figures per run: images/s (wall clock, what a trainer waits for, but on a shared
machine also a share of its cores), and CPU ms per image (user + system of the run's
process and its workers: the work done, whatever the neighbours' load); a ratio > 1
means faster / cheaper than the peer.

Every measurement runs in its own process (this file run by path, ``--child``), so
``--baseline DIR`` can time an older checkout's backends (PYTHONPATH=DIR; its ``pil``,
or those ``--baseline-contenders`` names) in the same run. Contenders are interleaved
(peer, pil, dali-cpu, peer, ...), the first batches of each (fork, pipeline build, the
prefetch made meanwhile) are not timed, and each ratio is taken against the peer run of
the same repeat; medians over repeats.

Shards: ``KEY.jpg`` + ``KEY.json`` tars, which both read as they are; their images are
crops of the real photos that ship with scikit-learn and matplotlib (bench_data's
photo-like JPEGs without them), re-encoded at COCO's sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TREE = Path(__file__).resolve().parents[1]
CONTENDERS = ("peer", "pil", "dali-cpu")
WARM = 4  # untimed batches after the first: the prefetch queues (2 workers x 2) filled at start-up
COLUMNS = [
    "repeat",
    "contender",
    "tree",
    "images",
    "seconds",
    "images_per_s",
    "vs_peer",
    "cpu_ms_per_image",
    "cpu_vs_peer",
    "load_1min",
]


def peer_loader(shards: Path, batch_size: int, workers: int, shorter: int, max_size: int):
    """webdataset + torch DataLoader, the OpenCLIP way (module docstring)."""
    import torch
    import webdataset as wds
    from torchvision import transforms

    from pixelbert_dist.data.decode.images import MEAN_255, STD_255, pad_batch

    preprocess = transforms.Compose(
        [
            transforms.Resize(shorter, max_size=max_size, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize([m / 255 for m in MEAN_255], [s / 255 for s in STD_255]),
        ]
    )

    def collate(samples):
        images, metas = zip(*samples)
        padded, sizes = pad_batch(list(images))
        return padded, sizes, [meta["captions"][0] for meta in metas]

    urls = sorted(str(p) for p in shards.glob("*.tar"))
    dataset = (
        wds.WebDataset(urls, shardshuffle=False, empty_check=False)
        .decode("pilrgb")
        .to_tuple("jpg;png;jpeg;webp", "json")
        .map_tuple(preprocess, lambda meta: meta)
        .batched(batch_size, collation_fn=collate, partial=False)
    )
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)


def project_loader(shards: Path, backend: str, batch_size: int, workers: int, shorter: int, max_size: int):
    from pixelbert_dist.data.config import DataConfig
    from pixelbert_dist.data.loader import build_loader

    cfg = DataConfig(
        backend=backend, image_shorter=shorter, image_max=max_size, num_workers=workers, hflip=True, bucketing=False
    )
    return build_loader(cfg, shards, batch_size, device="cpu")


def cpu_seconds(processes) -> float:
    """User + system CPU seconds of ``processes`` (a run's own process and its workers)."""
    return sum(sum(p.cpu_times()[:2]) for p in processes)


def child(args) -> None:
    """One timed run: the first ``1 + WARM`` batches untimed (start-up and what was
    prefetched meanwhile), then ``--batches`` batches; JSON on stdout."""
    import torch  # here, not at the top: --help answers without torch

    sizes = (args.shorter, args.max_size)
    if args.child == "peer":
        loader = peer_loader(Path(args.shards), args.batch_size, args.workers, *sizes)
    else:
        backend = {"pil": "pil", "dali-cpu": "dali"}[args.child]
        loader = project_loader(Path(args.shards), backend, args.batch_size, args.workers, *sizes)
    batches = iter(loader)
    for _ in range(1 + WARM):
        next(batches)
    import psutil

    me = psutil.Process()
    processes = [me, *me.children(recursive=True)]  # the DataLoader workers (DALI: threads of this one)
    images, start, cpu_start = 0, time.perf_counter(), cpu_seconds(processes)
    for _ in range(args.batches):
        batch = next(batches)
        pixels = batch["images"] if isinstance(batch, dict) else batch[0]
        assert pixels.dtype == torch.float32 and pixels.shape[-1] % 64 == 0, (pixels.dtype, pixels.shape)
        images += pixels.shape[0]
    seconds, cpu = time.perf_counter() - start, cpu_seconds(processes) - cpu_start
    del batches
    got = {"images": images, "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 2)}
    print(json.dumps({**got, "cpu_ms_per_image": round(cpu / images * 1000, 1)}))


def run_child(contender: str, tree: Path, shards: Path, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", contender, "--shards", str(shards)]
    for flag in ("batches", "batch_size", "workers", "shorter", "max_size"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{contender} ({tree}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def sample_photos() -> list[Path]:
    """The real photos shipped inside installed packages (none: an empty list)."""
    import importlib.util

    found = []
    for package, parts in [("sklearn", ("datasets", "images")), ("matplotlib", ("mpl-data", "sample_data"))]:
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin:
            found += sorted(Path(spec.origin).parent.joinpath(*parts).glob("*.jpg"))
    return found


class PhotoCrops:
    """``jpeg(height, width, rng)``: a random crop of a real photo with that aspect,
    resized to height x width and encoded at quality 90 (for ``bench_data.make_shards``)."""

    def __init__(self, photos: list[Path]):
        from PIL import Image

        self.photos = [Image.open(p).convert("RGB") for p in photos]

    def __call__(self, height: int, width: int, rng) -> bytes:
        import io

        from PIL import Image

        photo = self.photos[int(rng.integers(len(self.photos)))]
        scale = min(photo.width / width, photo.height / height) * rng.uniform(0.6, 1.0)
        w, h = int(width * scale), int(height * scale)
        x, y = int(rng.integers(photo.width - w + 1)), int(rng.integers(photo.height - h + 1))
        buf = io.BytesIO()
        photo.crop((x, y, x + w, y + h)).resize((width, height), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
        return buf.getvalue()


def make_photo_shards(directory: Path, num: int, per_shard: int) -> tuple[Path, str]:
    from benchmarks.bench_data import make_shards, photo_like_jpeg

    photos = sample_photos()
    jpeg = PhotoCrops(photos) if photos else photo_like_jpeg
    kind = f"crops of {', '.join(p.name for p in photos)}" if photos else "bench_data's photo-like JPEGs"
    return make_shards(directory, num, per_shard=per_shard, jpeg=jpeg), kind


def measure(args, shards: Path) -> list[dict]:
    contenders = [(name, TREE, "this") for name in CONTENDERS]
    if args.baseline:
        contenders += [(name, Path(args.baseline).resolve(), "baseline") for name in baseline_contenders(args)]
    rows = []
    for repeat in range(args.repeats):
        peer: dict = {}
        for name, tree, label in contenders:
            got = run_child(name, tree, shards, args)
            peer = got if name == "peer" else peer
            row = {"repeat": repeat, "contender": name, "tree": label, **got}
            row["vs_peer"] = round(got["images_per_s"] / peer["images_per_s"], 3)
            cpu = (peer["cpu_ms_per_image"], got["cpu_ms_per_image"])
            row["cpu_vs_peer"] = round(cpu[0] / cpu[1], 3) if all(cpu) else None  # 0: under a clock tick
            row["load_1min"] = round(os.getloadavg()[0], 2)
            rows.append(row)
            print(" ".join(f"{k}={row[k]}" for k in COLUMNS), flush=True)
    return rows


def baseline_contenders(args) -> list[str]:
    names = [name.strip() for name in args.baseline_contenders.split(",") if name.strip()]
    unknown = [name for name in names if name not in CONTENDERS[1:]]
    if unknown or not names:
        raise SystemExit(f"--baseline-contenders {args.baseline_contenders!r}: pick from {', '.join(CONTENDERS[1:])}")
    return names


def summary(rows: list[dict]) -> list[dict]:
    from benchmarks.common import median

    out = []
    for name, tree in dict.fromkeys((r["contender"], r["tree"]) for r in rows):
        mine = [r for r in rows if (r["contender"], r["tree"]) == (name, tree)]
        ratios = [r["vs_peer"] for r in mine]
        cpu_ratios = [r["cpu_vs_peer"] for r in mine if r["cpu_vs_peer"] is not None]
        out.append(
            {
                "contender": name,
                "tree": tree,
                "images_per_s": median(r["images_per_s"] for r in mine),
                "vs_peer": median(ratios),
                "vs_peer_min": min(ratios),
                "vs_peer_max": max(ratios),
                "cpu_ms_per_image": median(r["cpu_ms_per_image"] for r in mine),
                "cpu_vs_peer": median(cpu_ratios) if cpu_ratios else None,
                "cpu_vs_peer_min": min(cpu_ratios, default=None),
                "cpu_vs_peer_max": max(cpu_ratios, default=None),
                "repeats": len(mine),
            }
        )
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", help="a folder of KEY.jpg + KEY.json tars with a manifest (default: made here)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, default=10, help="timed batches per run (after one untimed)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers / DALI threads, for all")
    parser.add_argument("--shorter", type=int, default=800)
    parser.add_argument("--max-size", type=int, default=1333)
    parser.add_argument("--baseline", help="an older checkout whose backends also run (PYTHONPATH=it)")
    parser.add_argument(
        "--baseline-contenders", default="pil", help="which of pil,dali-cpu the --baseline tree runs (comma list)"
    )
    parser.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help="results folder (default: a new one)")
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    if args.baseline:
        baseline_contenders(args)  # a wrong name stops here, before any shard is made
    import tempfile

    from benchmarks.common import write_results

    with tempfile.TemporaryDirectory() as tmp:
        per_shard = (args.batches + WARM + 2) * args.batch_size // args.workers + 1  # a worker's 2 shards last a run
        shards, images = (
            (Path(args.shards), args.shards)
            if args.shards
            else make_photo_shards(Path(tmp) / "train", per_shard * 4, per_shard)
        )
        print(f"shards: {shards} ({images}); {len(list(shards.glob('*.tar')))} tars", flush=True)
        rows = measure(args, shards)
    config = {k: getattr(args, k) for k in ("repeats", "batches", "batch_size", "workers", "shorter", "max_size")}
    config["images"] = images
    config.update(baseline="peer (webdataset + DataLoader, OpenCLIP-style)", target="pil and dali-cpu >= 1.5x peer")
    write_results("bench_loader_peer", rows, config, args.out, COLUMNS)
    table = summary(rows)
    write_results("bench_loader_peer_summary", table, config, args.out, list(table[0]))


if __name__ == "__main__":
    main()
