"""How a rank's start-up and memory grow with the sample count (the indexed loader).

    python -m benchmarks.bench_index                      # 10^4, 10^5, 10^6 samples
    python -m benchmarks.bench_index --sizes 10000 100000 --baseline /tmp/old_tree
    python -m benchmarks.bench_index --stream             # streamed from disk and 127.0.0.1 http
                                                          # (http also without index sidecars)
    python -m benchmarks.bench_index --stream --stream-backends dali --sizes 10000
    python -m benchmarks.bench_index --plan --baseline /tmp/old_tree   # the epoch plan alone, 10^6..10^9
    python -m benchmarks.bench_index --stream-resume      # a streamed resume at 10^3..2x10^5 samples in
    python -m benchmarks.bench_index --foreign            # make_shards.py index on foreign tars vs their
                                                          # headers alone (benchmarks/foreign_index.py)

Builds one split of tiny JPEGs (four pre-encoded 6..12 px images reused, no PIL per
sample; 10,000 samples a shard) once, cached under ``.cache/bench_index/`` (gitignored);
the smaller splits are manifests over the first shards of the largest (symlinks). Each
measurement runs in a fresh process, as a rank would start: ``build_loader(rank=0,
world_size=8, bucketing=True)``, the epoch plan, then the first batch (PIL, in-process).
Reported per size: start-up seconds (build_loader + plan), first-batch seconds, and
the RSS the loader added (psutil RSS after the first batch minus before build_loader,
tokenizer loaded before, so it is not counted). ``--baseline DIR`` times another tree
(e.g. ``git archive`` of the commit before the index) on the same splits, side by side.

``--plan`` times the epoch plan alone (no shards: a synthetic aspect function stands in
for the index, bucketing on), one rank of 8 at 10^6..10^9 samples: start-up (plan built
and its length), the first batch, a batch mid-epoch (what a resume reads first), RSS
added and its peak, and in a second fresh process the tracemalloc peak (numpy buffers
included). ``--baseline`` runs the same on another tree up to ``--baseline-max``.

``--stream-resume`` times a streamed resume: one worker's stream (2x10^5 samples in 20
shards over 127.0.0.1 http, shuffle buffer 1000) from ``skip`` samples in to its first
sample, with the shards' index sidecars (the skip replayed over positions) and without
(the skipped samples read again), side by side, with the shards each one opened.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

# The --measure child runs this file by its path with PYTHONPATH=<the tree measured>, so
# this module imports nothing of this repo at its top (benchmarks.common only in main,
# after the child's branches): the child's pixelbert_dist is the --baseline tree's.
ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "bench_index"
PER_SHARD = 10_000
COLUMNS = ["code", "samples", "shards", "startup_s", "first_batch_s", "rss_added_mb"]
PLAN_COLUMNS = [
    "code",
    "samples",
    "startup_s",
    "first_batch_s",
    "resume_batch_s",
    "rss_added_mb",
    "peak_rss_added_mb",
    "tracemalloc_peak_mb",
]


def tiny_jpegs() -> list[tuple[bytes, int, int]]:
    from PIL import Image

    out = []
    for width, height in [(8, 6), (6, 8), (12, 6), (6, 6)]:
        buf = io.BytesIO()
        Image.new("RGB", (width, height), (40 * width, 90, 20 * height)).save(buf, "JPEG")
        out.append((buf.getvalue(), width, height))
    return out


_TEMPLATE = bytearray(tarfile.TarInfo("x").tobuf(tarfile.USTAR_FORMAT))


def ustar_header(name: str, size: int) -> bytes:
    """The header ``shards.write_shard`` writes (tarfile's, mtime 0, mode 0644), built
    from a template: tarfile's own header code is ~80% of writing a tiny sample."""
    header = bytearray(_TEMPLATE)
    header[0:100] = name.encode().ljust(100, b"\0")
    header[124:136] = b"%011o\0" % size
    header[148:156] = b" " * 8
    header[148:155] = b"%06o\0" % sum(header)
    return bytes(header)


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def write_tiny_shard(path: Path, first: int, count: int, jpegs):
    """``count`` samples written directly (same bytes as write_shard) with the index."""
    # imported here: ``--measure`` also runs under a --baseline tree without shard_index
    from pixelbert_dist.data.format.index import IndexBuilder, index_name
    from pixelbert_dist.data.format.shards import ShardInfo, encode_meta

    parts, index, offset = [], IndexBuilder(), 0
    for i in range(first, first + count):
        jpeg, width, height = jpegs[i % len(jpegs)]
        key = f"s{i:09d}"
        meta = {"key": key, "captions": [f"tiny image {i}"], "image_id": str(i), "width": width, "height": height}
        raw = encode_meta(meta)
        parts += [ustar_header(f"{key}.jpg", len(jpeg)), _pad(jpeg), ustar_header(f"{key}.json", len(raw)), _pad(raw)]
        jpg_at = offset + tarfile.BLOCKSIZE
        offset = jpg_at + len(parts[-3]) + tarfile.BLOCKSIZE
        index.add(jpg_at, jpeg, offset, len(raw), meta)
        offset += len(parts[-1])
    data = b"".join(parts) + b"\0" * (2 * tarfile.BLOCKSIZE)
    data += b"\0" * (-len(data) % tarfile.RECORDSIZE)
    index.save(path.with_name(index_name(path.name)))
    path.write_bytes(data)
    return ShardInfo(path.name, count, hashlib.sha256(data).hexdigest())


def bytes_per_sample(jpegs, probe: int = 200) -> float:
    """Disk bytes per sample of the splits built here (tar + index sidecar), from a
    ``probe``-sample shard written the same way to a temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_shard(Path(tmp) / "probe-000000.tar", 0, probe, jpegs)
        return sum(f.stat().st_size for f in Path(tmp).iterdir()) / probe


def size_text(num_bytes: float) -> str:
    return f"{num_bytes / 1e9:.2f} GB" if num_bytes >= 1e9 else f"{num_bytes / 1e6:.1f} MB"


def say_what_it_writes(num: int, directory: Path, jpegs) -> None:
    """A split of 10^6 samples is ~2.6 GB: say how much and where before writing it, and
    refuse when the disk there lacks the room."""
    need = bytes_per_sample(jpegs) * num
    directory.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory.parent).free
    if need > free:
        raise SystemExit(
            f"bench_index: {num} samples need ~{size_text(need)} in {directory}, and {size_text(free)} are "
            f"free there: use smaller --sizes, or free space (rm -rf {CACHE} drops earlier splits)"
        )
    print(
        f"bench_index: writing ~{size_text(need)} ({num} samples) into {directory} ({size_text(free)} free "
        f"there); kept for later runs: rm -rf {CACHE} reclaims it",
        flush=True,
    )


def build_largest(num: int) -> Path:
    """The largest split, written once (tiny JPEG bytes reused, tar written directly)."""
    from pixelbert_dist.data.format.shards import Manifest, shard_name, write_manifest

    directory = CACHE / f"n{num}"
    if (directory / "manifest.json").is_file():
        print(f"bench_index: reusing the {num}-sample split in {directory}", flush=True)
        return directory
    say_what_it_writes(num, directory, tiny_jpegs())
    directory.mkdir(parents=True, exist_ok=True)
    jpegs, shards, start = tiny_jpegs(), [], time.perf_counter()
    for s in range(-(-num // PER_SHARD)):
        first = s * PER_SHARD
        shards.append(write_tiny_shard(directory / shard_name("tiny", s), first, min(PER_SHARD, num - first), jpegs))
    write_manifest(directory, Manifest("tiny", num, shards, source="bench_index"))
    print(f"built {num} samples in {time.perf_counter() - start:.1f} s -> {directory}", flush=True)
    return directory


def without_sidecars(directory: Path) -> Path:
    """The split's tars alone (symlinks): streamed, they are checked by decoding only, so
    set beside the split they show what fetching and checking the sidecars costs."""
    bare = CACHE / f"{directory.name}-no-sidecar"
    bare.mkdir(exist_ok=True)
    for tar in directory.glob("*.tar"):
        if not (bare / tar.name).exists():
            (bare / tar.name).symlink_to(tar.resolve())
    return bare


def subset(largest: Path, num: int) -> Path:
    """A split of the first ``num`` samples of ``largest``: symlinks + its own manifest."""
    manifest = json.loads((largest / "manifest.json").read_text())
    directory = CACHE / f"n{num}"
    if (directory / "manifest.json").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    shards = manifest["shards"][: -(-num // PER_SHARD)]
    for shard in shards:
        for name in (shard["file"], shard["index"]):
            link = directory / name
            if not link.exists():
                link.symlink_to(largest / name)
    total = sum(s["num_samples"] for s in shards)
    (directory / "manifest.json").write_text(json.dumps({**manifest, "num_samples": total, "shards": shards}))
    return directory


def measure(directory: str, batch_size: int) -> dict:
    """Runs in a fresh process (``--measure``): one rank's start-up."""
    import psutil

    import pixelbert_dist
    from pixelbert_dist.data.config import DataConfig
    from pixelbert_dist.data.loader import build_loader
    from pixelbert_dist.data.text import load_tokenizer

    tokenizer = load_tokenizer(None)
    process = psutil.Process()
    rss0 = process.memory_info().rss
    start = time.perf_counter()
    cfg = DataConfig(backend="pil", bucketing=True, num_workers=0, image_shorter=32, image_max=64)
    loader = build_loader(cfg, directory, batch_size, rank=0, world_size=8, tokenizer=tokenizer)
    batches = len(loader)
    startup = time.perf_counter() - start
    next(iter(loader))
    first = time.perf_counter() - start - startup
    return {
        "startup_s": round(startup, 3),
        "first_batch_s": round(first, 3),
        "rss_added_mb": round((process.memory_info().rss - rss0) / 2**20, 1),
        "batches": batches,
        "code_dir": str(Path(pixelbert_dist.__file__).parents[1]),
    }


def measure_stream(spec: str, batch_size: int, batches: int, backend: str = "pil") -> dict:
    """Streaming mode (``--measure-stream``): start-up, first batch, then img/s over
    ``batches`` more batches (``backend``, 2 stream workers, shuffle buffer 1000,
    resampled shards: the small splits have fewer shards than 8 ranks x 2 workers)."""
    import psutil

    import pixelbert_dist
    from pixelbert_dist.data.config import DataConfig
    from pixelbert_dist.data.loader import build_loader
    from pixelbert_dist.data.text import load_tokenizer

    tokenizer = load_tokenizer(None)
    process = psutil.Process()
    rss0 = process.memory_info().rss
    start = time.perf_counter()
    cfg = DataConfig(
        backend=backend,
        num_workers=2,
        image_shorter=32,
        image_max=64,
        epoch_samples=8 * batch_size * (batches + 1),
        resampled=True,
    )
    loader = build_loader(cfg, spec, batch_size, rank=0, world_size=8, tokenizer=tokenizer)
    startup = time.perf_counter() - start
    it = iter(loader)
    next(it)
    first = time.perf_counter() - start - startup
    rss = (process.memory_info().rss - rss0) / 2**20
    timed = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * batch_size / (time.perf_counter() - timed)
    return {
        "startup_s": round(startup, 3),
        "first_batch_s": round(first, 3),
        "rss_added_mb": round(rss, 1),
        "images_per_s": round(rate, 1),
        "batches": batches,
        "code_dir": str(Path(pixelbert_dist.__file__).parents[1]),
    }


def synthetic_aspect(indices):
    """width / height from the sample index alone (0.5 .. 2.5): bucketing without an index."""
    import numpy as np

    return 0.5 + (np.asarray(indices, dtype=np.int64) * 2654435761 % 1000) / 500


def reset_peak_rss() -> None:
    """Restart the kernel's RSS high-water mark (Linux >= 4.0), so the peak is the plan's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss() -> int | None:
    """Peak RSS in bytes since ``reset_peak_rss`` (VmHWM), None where /proc has none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def measure_plan(num: int, batch_size: int, traced: bool) -> dict:
    """One rank's epoch plan over ``num`` samples (``--measure-plan``, a fresh process)."""
    import tracemalloc

    import psutil

    import pixelbert_dist
    from pixelbert_dist.data.readers.plan import epoch_plan

    reset_peak_rss()
    rss0 = psutil.Process().memory_info().rss
    if traced:
        tracemalloc.start()
    start = time.perf_counter()
    plan = epoch_plan(
        num, epoch=1, seed=0, rank=0, world_size=8, batch_size=batch_size, aspect=synthetic_aspect, bucket_window=16
    )
    batches = len(plan)
    startup = time.perf_counter() - start
    len(plan[0])
    first = time.perf_counter() - start - startup
    timed = time.perf_counter()
    len(plan[batches // 2 + 1])
    row = {"startup_s": round(startup, 5), "first_batch_s": round(first, 5)}
    row["resume_batch_s"] = round(time.perf_counter() - timed, 5)
    if traced:
        return {"tracemalloc_peak_mb": round(tracemalloc.get_traced_memory()[1] / 2**20, 2)}
    peak = peak_rss()
    return {
        **row,
        "rss_added_mb": round((psutil.Process().memory_info().rss - rss0) / 2**20, 1),
        "peak_rss_added_mb": None if peak is None else round(max(0, peak - rss0) / 2**20, 1),
        "batches": batches,
        "code_dir": str(Path(pixelbert_dist.__file__).parents[1]),
    }


def run_plan_measure(num: int, code: Path, batch_size: int) -> dict:
    row = {}
    for traced in (False, True):
        extra = ["--traced"] if traced else []
        row.update(run_measure(str(num), code, batch_size, mode=["--measure-plan", str(num), *extra]))
    return row


def plan_main(args, write_results) -> None:
    """``--plan``: the plan alone at each size, this tree and the baseline side by side."""
    codes = [("lazy", ROOT)] + ([("baseline", args.baseline)] if args.baseline else [])
    rows = []
    for num in sorted(args.sizes):
        for label, code in codes:
            if label == "baseline" and num > args.baseline_max:
                continue
            row = {"code": label, "samples": num, **run_plan_measure(num, code, args.batch_size)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    config = {
        "world_size": 8,
        "rank": 0,
        "bucketing": True,
        "bucket_window": 16,
        "aspect": "synthetic (bench_index.synthetic_aspect)",
        "batch_size": args.batch_size,
        "baseline": str(args.baseline or ""),
    }
    write_results("bench_plan", rows, config, args.out, PLAN_COLUMNS)


def run_measure(
    directory: Path | str,
    code: Path,
    batch_size: int,
    stream_batches: int = 0,
    backend: str = "pil",
    mode: list[str] | None = None,
) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code)}
    if mode is None:
        mode = (
            ["--measure-stream", str(directory), "--stream-batches", str(stream_batches), "--backend", backend]
            if stream_batches
            else ["--measure", str(directory)]
        )
    proc = subprocess.run(
        [sys.executable, __file__, *mode, "--batch-size", str(batch_size)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"measure {directory} with {code} failed:\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    if "code_dir" in row and Path(row.pop("code_dir")).resolve() != Path(code).resolve():
        raise RuntimeError(f"measured the tree at {row}, not {code}")
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--quick", action="store_true", help="10^4 and 10^5 samples only")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--baseline", type=Path, help="another source tree to time alike")
    parser.add_argument(
        "--baseline-max",
        type=int,
        help="largest size to time the baseline at (it may take minutes; default 10^5, with --plan 10^8)",
    )
    parser.add_argument("--out", help="results folder (default: a new benchmarks/results/<machine>-<date>-single/)")
    parser.add_argument(
        "--stream",
        action="store_true",
        help="streaming mode instead: the splits as local brace patterns and "
        "from a local http.server (127.0.0.1), start-up and img/s; writes ~2.6 GB per 10^6 samples "
        "into .cache/bench_index (said before it starts)",
    )
    parser.add_argument("--stream-batches", type=int, default=100)
    parser.add_argument("--stream-backends", nargs="+", default=["pil", "dali"], choices=["pil", "dali", "nvjpeg"])
    parser.add_argument("--backend", default="pil", help=argparse.SUPPRESS)  # of --measure-stream
    parser.add_argument(
        "--plan",
        action="store_true",
        help="the epoch plan alone (synthetic aspect ratios, no shards) at --sizes (default 10^6..10^9)",
    )
    parser.add_argument("--stream-resume", action="store_true", help="a streamed resume's cost by position")
    parser.add_argument("--foreign", action="store_true", help="indexing foreign tars vs their headers alone")
    parser.add_argument("--foreign-shards", type=int, default=2000)
    parser.add_argument("--foreign-per-shard", type=int, default=20)
    parser.add_argument("--foreign-workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--measure-stream", help=argparse.SUPPRESS)
    parser.add_argument("--measure-plan", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_plan:
        print(json.dumps(measure_plan(args.measure_plan, args.batch_size, args.traced)))
        return
    if args.measure:
        print(json.dumps(measure(args.measure, args.batch_size)))
        return
    if args.measure_stream:
        print(json.dumps(measure_stream(args.measure_stream, args.batch_size, args.stream_batches, args.backend)))
        return
    from benchmarks.common import write_results

    if args.stream_resume:
        return resume_main(args, write_results)
    if args.foreign:
        from benchmarks.foreign_index import foreign_main

        return foreign_main(args, write_results, CACHE, tiny_jpegs(), ustar_header)
    if args.stream:
        return stream_main(args, write_results)
    if args.plan:
        if "--sizes" not in (argv if argv is not None else sys.argv):
            args.sizes = [10**6, 10**7, 10**8, 10**9]
        args.baseline_max = args.baseline_max or 10**8
        return plan_main(args, write_results)
    args.baseline_max = args.baseline_max or 100_000
    if args.quick:
        args.sizes = [10_000, 100_000]
    largest = build_largest(max(args.sizes))
    codes = [("indexed", ROOT)] + ([("baseline", args.baseline)] if args.baseline else [])
    rows = []
    for num in sorted(args.sizes):
        directory = subset(largest, num) if num < max(args.sizes) else largest
        for label, code in codes:
            if label == "baseline" and num > args.baseline_max:
                continue
            row = {
                "code": label,
                "samples": num,
                "shards": -(-num // PER_SHARD),
                **run_measure(directory, code, args.batch_size),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    write_results(
        "bench_index",
        rows,
        {
            "world_size": 8,
            "rank": 0,
            "bucketing": True,
            "backend": "pil",
            "num_workers": 0,
            "batch_size": args.batch_size,
            "samples_per_shard": PER_SHARD,
            "baseline": str(args.baseline or ""),
        },
        args.out,
        COLUMNS,
    )


@contextlib.contextmanager
def http_server(directory: Path):
    """``python -m http.server`` over ``directory`` on 127.0.0.1; yields its port."""
    server = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(directory)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        yield int(server.stdout.readline().split("port ")[1].split()[0])
    finally:
        server.terminate()
        server.wait(timeout=10)


def stream_main(args, write_results) -> None:
    """The same splits streamed: from local paths and over HTTP from 127.0.0.1."""
    largest = build_largest(max(args.sizes))
    with http_server(CACHE) as port:
        rows = []
        for num in sorted(args.sizes):
            directory = subset(largest, num) if num < max(args.sizes) else largest
            pattern = f"tiny-{{000000..{-(-num // PER_SHARD) - 1:06d}}}.tar"
            sources = [
                ("stream-disk", f"{directory}/{pattern}"),
                ("stream-http", f"http://127.0.0.1:{port}/{directory.name}/{pattern}"),
                ("stream-http-no-sidecar", f"http://127.0.0.1:{port}/{without_sidecars(directory).name}/{pattern}"),
            ]
            for backend in args.stream_backends:  # disk and http side by side, per backend
                for label, spec in sources:
                    row = {
                        "code": label,
                        "backend": backend,
                        "samples": num,
                        "shards": -(-num // PER_SHARD),
                        **run_measure(spec, ROOT, args.batch_size, args.stream_batches, backend),
                    }
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    write_results(
        "bench_stream",
        rows,
        {
            "world_size": 8,
            "rank": 0,
            "backends": args.stream_backends,
            "num_workers": 2,
            "shuffle_buffer": 1000,
            "resampled": True,
            "batch_size": args.batch_size,
            "timed_batches": args.stream_batches,
        },
        args.out,
        ["code", "backend", *COLUMNS[1:], "images_per_s"],
    )


RESUME_SAMPLES, RESUME_SKIPS = 200_000, (1_000, 10_000, 50_000, 100_000, 199_000)


def resume_main(args, write_results) -> None:
    """``--stream-resume``: seconds from a resume at ``skip`` to the first sample, and the
    shards it opened, with and without index sidecars, over 127.0.0.1 http."""
    from pixelbert_dist.data.readers import stream as streaming
    from pixelbert_dist.data.readers.stream_urls import expand

    directory = build_largest(RESUME_SAMPLES)
    pattern = f"tiny-{{000000..{RESUME_SAMPLES // PER_SHARD - 1:06d}}}.tar"
    opened, read_shard = [], streaming.read_shard
    streaming.read_shard = lambda url, *rest: opened.append(url) or read_shard(url, *rest)  # counts opens
    with http_server(CACHE) as port:
        rows = []
        for skip in RESUME_SKIPS:
            for label, folder in (("sidecars", directory), ("no-sidecars", without_sidecars(directory))):
                urls = expand(f"http://127.0.0.1:{port}/{folder.name}/{pattern}")
                plan = streaming.StreamPlan(urls, 0, 0, 0, 1, args.batch_size, 10**6, False, True, 1000, 2)
                opened.clear()
                start = time.perf_counter()
                next(plan.samples(0, 1, [], skip=skip))
                seconds = time.perf_counter() - start
                row = {"code": label, "skip": skip, "resume_s": seconds, "shards_opened": len(opened)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    config = {"samples": RESUME_SAMPLES, "samples_per_shard": PER_SHARD, "shuffle_buffer": 1000, "source": "http"}
    write_results("bench_stream_resume", rows, config, args.out, ["code", "skip", "resume_s", "shards_opened"])


if __name__ == "__main__":
    main()
