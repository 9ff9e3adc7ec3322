"""File-system metadata per rank of the indexed reader, as a shared file system sees it.

1. Start-up: file-system calls (strace, counted between two marker calls) of opening a
   split (``ShardIndex``) and planning rank 0 of 512 (its first batch's indices), at 10^2,
   10^4 and 10^5 shards; with ``--baseline TREE`` the same for another source tree,
   side by side.
2. Opens per sample over one epoch of one rank: the reader's open policy (a 64-entry
   LRU of tar descriptors and sidecar maps) replayed over the rank's whole plan, at the
   sizes of the issue (COCO+VG: 2.2x10^5 samples in 111 shards; 10^8 samples in 5x10^4
   shards) and 8 / 512 ranks; the global order read every W-th slot (the old plan) vs
   the shard-window order read in blocks. The replay is checked against the opens a real
   ``ShardIndex`` makes on a small split (``--check``).
3. The same-shard fraction of in-batch pairs (what ITM's in-batch negatives see), for the
   indexed plan and for the streamed reader (``readers/stream_mix.py``: its real order
   replayed over shard lengths), the old streaming default (1 shard in flight) beside the
   new one (16), each with a 1000-sample buffer, at the same sizes.
4. With ``--stream-only``: 3's streamed rows alone, plus the memory of the open reads a
   worker holds (the private memory, PSS, of the curl processes of N shards in flight over
   http from a local server).

    python -m benchmarks.bench_metadata [--baseline OLD_TREE] [--stream-only] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import OrderedDict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MARK = "/nonexistent-bench-metadata-marker"
MAX_OPEN = 64  # readers.indexed.MAX_OPEN_SHARDS
FILE_CALLS = re.compile(r"^\d+\s+(openat|open|stat|lstat|newfstatat|statx|fstat|access|faccessat2?|readlink)\(")


def write_split(directory: Path, shards: int, per_shard: int = 1) -> Path:
    from benchmarks.bench_index import tiny_jpegs, write_tiny_shard
    from pixelbert_dist.data.format.shards import Manifest, shard_name, write_manifest

    if (directory / "manifest.json").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    jpegs = tiny_jpegs()
    infos = [write_tiny_shard(directory / shard_name("m", s), s * per_shard, per_shard, jpegs) for s in range(shards)]
    write_manifest(directory, Manifest("m", shards * per_shard, infos, source="bench_metadata"))
    return directory


def child_startup(directory: str) -> None:
    """What a rank does at start-up, run twice (the first warms Python's lazy imports)
    and the second between two marker calls strace can see."""
    try:
        from pixelbert_dist.data.readers.indexed import ShardIndex
        from pixelbert_dist.data.readers.plan import epoch_plan
    except ImportError:  # a tree from before data/ was split by job
        from pixelbert_dist.data.samples import ShardIndex
        from pixelbert_dist.data.sampling import epoch_plan

    def start() -> int:
        index = ShardIndex(directory)
        kw = dict(epoch=0, seed=0, rank=0, world_size=512, batch_size=32)
        try:
            plan = epoch_plan(len(index), shard_counts=index.counts, **kw)
        except (TypeError, AttributeError):  # a tree without the shard-window order
            plan = epoch_plan(len(index), **kw)
        return len(plan[0].indices)

    start()
    os.path.exists(MARK)
    first = start()
    os.path.exists(MARK)
    print(f"first batch: {first} samples")


def count_startup(directory: Path, code: Path) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".strace") as log:
        env = {**os.environ, "PYTHONPATH": str(code)}
        # run by path: a baseline tree may have no benchmarks package; the child imports only the library
        command = [sys.executable, str(Path(__file__).resolve()), "--child-startup", str(directory)]
        subprocess.run(["strace", "-f", "-qq", "-o", log.name, *command], env=env, check=True, cwd=code)
        lines = Path(log.name).read_text().splitlines()
    marks = [i for i, line in enumerate(lines) if MARK in line]
    calls: dict[str, int] = {}
    for line in lines[marks[0] + 1 : marks[-1]]:
        match = FILE_CALLS.match(line)
        if match:
            calls[match.group(1)] = calls.get(match.group(1), 0) + 1
    return {"file_calls": sum(calls.values()), **{f"n_{k}": v for k, v in sorted(calls.items())}}


def replay_opens(counts: np.ndarray, world: int, rank: int, batch: int, window: int, batches: int | None) -> dict:
    """Opens of one rank over its plan (tar + sidecar per LRU miss) and the same-shard
    fraction of its in-batch pairs; ``window=0``: the old global order, every W-th slot."""
    from pixelbert_dist.data.readers.plan import epoch_plan

    n = int(counts.sum())
    bounds = np.cumsum(counts)
    plan = epoch_plan(
        n, epoch=0, seed=0, rank=rank, world_size=world, batch_size=batch,
        shard_counts=counts if window else None, shard_window=window or 16,
    )  # fmt: skip
    lru: OrderedDict[int, None] = OrderedDict()
    opens = samples = same = pairs = 0
    for k in range(len(plan) if batches is None else min(batches, len(plan))):
        shards = np.searchsorted(bounds, plan[k].indices, side="right")
        for shard in shards.tolist():
            if shard in lru:
                lru.move_to_end(shard)
                continue
            opens += 2
            lru[shard] = None
            if len(lru) > MAX_OPEN:
                lru.popitem(last=False)
        samples += len(shards)
        _, per = np.unique(shards, return_counts=True)
        same, pairs = same + int((per * (per - 1)).sum()), pairs + len(shards) * (len(shards) - 1)
    per_sample = opens / samples
    return {"samples_read": samples, "opens": opens, "opens_per_sample": per_sample, "same_shard_pairs": same / pairs}


def check_replay(directory: Path, world: int, window: int) -> dict:
    """Real opens of a ShardIndex reading a rank's plan vs the replay's count."""
    from pixelbert_dist.data.readers.indexed import ShardIndex
    from pixelbert_dist.data.readers.plan import epoch_plan

    index, real = ShardIndex(directory), {"n": 0}
    opened = os.open

    def counting(path, *args, **kwargs):
        real["n"] += str(path).endswith(".tar")
        return opened(path, *args, **kwargs)

    os.open = counting
    try:
        kw = dict(epoch=0, seed=0, rank=0, world_size=world, batch_size=8)
        plan = epoch_plan(len(index), shard_counts=index.counts if window else None, shard_window=window or 16, **kw)
        for k in range(len(plan)):
            for i in plan[k].indices.tolist():
                index.read(i)
    finally:
        os.open = opened
    replay = replay_opens(index.counts, world, 0, 8, window, None)
    return {"window": window, "real_tar_opens": real["n"], "replay_tar_opens": replay["opens"] // 2}


def stream_pairs(counts: np.ndarray, world: int, in_flight: int, batch: int, batches: int) -> dict:
    """The same-shard fraction of in-batch pairs of rank 0's worker 0 (of 2, the default
    data.num_workers) of ``world`` ranks: its real sample order (``position_stream``)
    over shards of ``counts`` samples, cut into batches as a worker makes them."""
    from pixelbert_dist.data.readers.stream import StreamPlan
    from pixelbert_dist.data.readers.stream_mix import mix_width, position_stream

    urls = [f"s{i}" for i in range(len(counts))]
    resampled = len(urls) < world * 2  # as the loader demands
    plan = StreamPlan(urls, 0, 0, 0, world, batch, batches, resampled, True, 1000, 0, in_flight)
    length = dict(zip(urls, counts.tolist()))
    where = position_stream(plan, 0, 2, length.__getitem__)
    opened = [where.seen[shard] for shard, _ in itertools.islice(where.samples, batch * batches)]
    shards = np.array([int(url[1:]) for url in opened]).reshape(batches, batch)  # a shard read again is the same
    same = 0
    for chunk in shards:
        _, per = np.unique(chunk, return_counts=True)
        same += int((per * (per - 1)).sum())
    return {
        "resampled": resampled,
        "width": mix_width(plan, 0, 2),
        "samples_read": batch * batches,
        "same_shard_pairs": same / (batches * batch * (batch - 1)),
    }


def resume_rereads(counts: np.ndarray, world: int, in_flight: int, skip: int) -> dict:
    """Rows a resume after ``skip`` samples reads again (rank 0's worker 0 of 2): the
    shards still in flight or buffered, each read from its start (http(s), pipe:) or
    from its oldest row still needed (a ranged read: local files, fsspec stores)."""
    from pixelbert_dist.data.readers.stream import StreamPlan
    from pixelbert_dist.data.readers.stream_mix import position_stream

    urls = [f"s{i}" for i in range(len(counts))]
    plan = StreamPlan(urls, 0, 0, 0, world, 32, 10**6, len(urls) < world * 2, True, 1000, 0, in_flight)
    length = dict(zip(urls, counts.tolist()))
    where = position_stream(plan, 0, 2, length.__getitem__)
    for _ in itertools.islice(where.samples, skip):
        pass
    needed: dict[int, list[int]] = {}
    for shard, row in where.buffer + [slot[1] for slot in where.mix.slots if slot is not None]:
        needed.setdefault(shard, []).append(row)
    return {
        "shards_reread": len(needed),
        "rows_from_start": sum(max(rows) + 1 for rows in needed.values()),
        "rows_ranged": sum(max(rows) - min(rows) + 1 for rows in needed.values()),
    }


def curl_memory(widths: list[int], out_dir: Path) -> list[dict]:
    """PSS of the curl processes (webdataset.gopen's http(s) reads) of N shards in flight,
    each read one sample in, as a worker holds them; shards of 40 x 100 KB from a local server."""
    import psutil

    from pixelbert_dist.data.readers.stream_read import read_shard

    folder = out_dir / "shards"
    write_big_shards(folder, max(widths))
    with http_server(folder) as url:
        rows = []
        for width in widths:
            reads = [read_shard(f"{url}/big-{i:03d}.tar", 0, []) for i in range(width)]
            for read in reads:
                next(read)
            curls = [p for p in psutil.Process().children(recursive=True) if p.name() == "curl"]
            pss = sum(p.memory_full_info().pss for p in curls)
            rows.append({"in_flight": width, "curl_processes": len(curls), "pss_mib": pss / 2**20})
            print(json.dumps(rows[-1]), flush=True)
            for read in reads:
                read.close()
    return rows


def write_big_shards(folder: Path, shards: int) -> None:
    import io
    import tarfile

    folder.mkdir(parents=True, exist_ok=True)
    payload = np.random.default_rng(0).bytes(100_000)
    for s in range(shards):
        with tarfile.open(folder / f"big-{s:03d}.tar", "w") as tar:
            for i in range(40):
                for name, data in ((f"k{s}_{i}.jpg", payload), (f"k{s}_{i}.txt", b"a caption")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


@contextlib.contextmanager
def http_server(folder: Path):
    """``python -m http.server`` on 127.0.0.1 over ``folder``; yields its URL once it answers."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(folder)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url, timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def stream_only(out: Path) -> None:
    """Part 3's streamed rows and part 4 (the module docstring)."""
    from benchmarks.common import write_results

    rows = []
    for name, samples, shards in SCALES + [("1e8 (img2dataset's 10^4 per shard)", 10**8, 10_000)]:
        counts = np.full(shards, samples // shards, dtype=np.int64)
        counts[: samples % shards] += 1
        for world in (8, 512):
            for in_flight, label in ((1, "old default"), (16, "new default")):
                row = {"set": name, "ranks": world, "shards_in_flight": in_flight, "default": label}
                row.update(stream_pairs(counts, world, in_flight, 32, 2000))
                rows.append(row)
                print(json.dumps(row), flush=True)
    config = {"target": "same-shard pairs <= 0.10", "batch": 32, "batches": 2000, "shuffle_buffer": 1000}
    write_results("stream_same_shard", rows, config, out, list(rows[0]))
    rows = []
    counts = np.full(10_000, 10_000, dtype=np.int64)  # 10^8 in img2dataset's shards
    for world in (8, 512):
        for in_flight in (1, 16):
            skip = 76_345  # samples the worker took before the save
            row = {"ranks": world, "shards_in_flight": in_flight, **resume_rereads(counts, world, in_flight, skip)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    config = {"set": "1e8 in 10^4 shards of 10^4", "skip": 76_345, "shuffle_buffer": 1000}
    write_results("stream_resume_rereads", rows, config, out, list(rows[0]))
    with tempfile.TemporaryDirectory() as scratch:
        rows = curl_memory([1, 4, 16], Path(scratch))
    write_results("stream_open_reads", rows, {"shard": "40 samples x 100 KB, http"}, out, list(rows[0]))


SCALES = [  # (name, samples, shards)
    ("coco+vg", 221_000, 111),
    ("1e8", 10**8, 50_000),
]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, help="another source tree whose start-up is counted alike")
    parser.add_argument("--shards", type=int, nargs="+", default=[100, 10_000, 100_000])
    parser.add_argument("--out", help="results folder (default: a new benchmarks/results/<machine>-<date>-metadata/)")
    parser.add_argument("--stream-only", action="store_true", help="only the streamed rows (parts 3 and 4)")
    parser.add_argument("--child-startup", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_startup:
        return child_startup(args.child_startup)
    from benchmarks.common import new_run_dir, write_results

    if args.stream_only:
        return stream_only(Path(args.out or new_run_dir("stream-mixing")))
    out = args.out or new_run_dir("metadata")
    cache = ROOT / ".cache" / "bench_metadata"
    print(f"writing up to {max(args.shards)} one-sample shards (~{max(args.shards) * 4.5 / 1000:.0f} MB) under {cache}")
    rows = []
    for shards in args.shards:
        directory = write_split(cache / f"s{shards}", shards)
        for label, code in [("this", ROOT)] + ([("baseline", args.baseline)] if args.baseline else []):
            rows.append({"shards": shards, "code": label, **count_startup(directory, code)})
            print(json.dumps(rows[-1]), flush=True)
    columns = sorted({k for row in rows for k in row}, key=lambda k: (k not in ("shards", "code"), k))
    write_results("metadata_startup", rows, {"target": "O(1) in the shard count"}, out, columns)
    checks = [check_replay(write_split(cache / "check", 200, 20), 2, w) for w in (0, 16)]
    write_results("metadata_replay_check", checks, {"target": "replay == real"}, out, list(checks[0]))
    rows = []
    for name, samples, shards in SCALES:
        counts = np.full(shards, samples // shards, dtype=np.int64)
        counts[: samples % shards] += 1
        for world in (8, 512):
            for window in (0, 16):
                row = {"set": name, "ranks": world, "order": f"window {window}" if window else "global"}
                row.update(replay_opens(counts, world, 0, 32, window, batches=2000))
                rows.append(row)
                print(json.dumps(row), flush=True)
    config = {"target": "opens per sample <= 0.01; same-shard pairs <= 0.10", "batch": 32, "batches": 2000}
    write_results("metadata_opens", rows, config, out, list(rows[0]))
    stream_only(Path(out))


if __name__ == "__main__":
    main()
