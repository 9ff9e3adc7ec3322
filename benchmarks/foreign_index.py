"""``python -m benchmarks.bench_index --foreign``: indexing foreign webdataset shards where they lie
(``make_shards.py index DIR``) against reading the same tars' headers alone.

    python -m benchmarks.bench_index --foreign --foreign-shards 2000 --foreign-per-shard 20

Writes ``--foreign-shards`` img2dataset-like tars once (cached under ``.cache/bench_index/``:
tiny JPEGs, ``KEY.jpg`` / ``KEY.txt`` / ``KEY.json`` per sample, USTAR headers), then times,
in this order and each with the same worker processes:

* ``headers``: every tar's headers walked (``tarfile`` in seekable mode: it seeks over
  the data), the floor any indexer that must find every member pays;
* ``read``: every tar's bytes read (``f.read``), what the index's CRC needs at least;
* ``index``: ``index_foreign`` (sidecars, sha256, image header sizes, the manifest),
  the sidecars and manifest removed before each run.

The tars are in the page cache throughout (written just before, and small): this compares
the indexer's CPU cost with the header walk's, not disk speeds. Target: index within 2x
of ``headers``.
"""

from __future__ import annotations

import json
import multiprocessing
import tarfile
import time
from pathlib import Path

COLUMNS = ["step", "shards", "samples", "workers", "seconds", "shards_per_s", "vs_headers"]


def write_foreign_set(directory: Path, shards: int, per_shard: int, jpegs, header) -> Path:
    """Tiny img2dataset-like tars (written once; ``header`` builds a USTAR header)."""
    if (directory / "done").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        parts = []
        for i in range(per_shard):
            key = f"{s:05d}{i:04d}"
            jpeg = jpegs[i % len(jpegs)][0]
            text = f"tiny image {key}".encode()
            meta = json.dumps({"key": key, "caption": text.decode(), "status": "success"}).encode()
            for name, data in ((f"{key}.jpg", jpeg), (f"{key}.txt", text), (f"{key}.json", meta)):
                parts += [header(name, len(data)), data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)]
        data = b"".join(parts) + b"\0" * (2 * tarfile.BLOCKSIZE)
        (directory / f"{s:05d}.tar").write_bytes(data + b"\0" * (-len(data) % tarfile.RECORDSIZE))
    (directory / "done").write_text("")
    return directory


def walk_headers(path: Path) -> int:
    with tarfile.open(path, "r:") as tar:
        return sum(1 for _ in tar)


def read_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        return len(f.read())


def _timed(function, tars: list[Path], workers: int) -> float:
    start = time.perf_counter()
    with multiprocessing.Pool(workers) as pool:
        for _ in pool.imap_unordered(function, tars, chunksize=8):
            pass
    return time.perf_counter() - start


def _time_index(directory: Path, workers: int) -> float:
    from pixelbert_dist.data.format.foreign_index import index_foreign

    for stale in list(directory.glob("*.idx.npy")) + [directory / "manifest.json", directory / "skipped.jsonl"]:
        stale.unlink(missing_ok=True)
    start = time.perf_counter()
    index_foreign(directory, workers=workers)
    return time.perf_counter() - start


def foreign_main(args, write_results, cache: Path, jpegs, header) -> None:
    directory = write_foreign_set(
        cache / f"foreign-{args.foreign_shards}x{args.foreign_per_shard}",
        args.foreign_shards,
        args.foreign_per_shard,
        jpegs,
        header,
    )
    tars = sorted(directory.glob("*.tar"))
    rows = []
    for workers in args.foreign_workers:
        seconds = {
            "headers": _timed(walk_headers, tars, workers),
            "read": _timed(read_bytes, tars, workers),
            "index": _time_index(directory, workers),
        }
        for step, took in seconds.items():
            row = {
                "step": step,
                "shards": len(tars),
                "samples": len(tars) * args.foreign_per_shard,
                "workers": workers,
                "seconds": round(took, 3),
                "shards_per_s": round(len(tars) / took, 1),
                "vs_headers": round(took / seconds["headers"], 2),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    config = {
        "baseline": "headers: the same tars' headers walked by tarfile (seekable mode), same workers",
        "target": "index within 2x of headers",
        "per_shard": args.foreign_per_shard,
        "page_cache": "warm (tars written just before)",
    }
    write_results("bench_index_foreign", rows, config, args.out, COLUMNS)
