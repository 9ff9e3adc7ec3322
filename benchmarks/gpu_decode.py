"""The GPU check's decode step: images/s of one backend over bench_data's photo-like JPEGs.

    python -m benchmarks.gpu_decode RESULTS nvjpeg|pil BATCHES BATCH_SIZE

bench_data itself compares every backend and reports DALI's version; DALI's wheel is too
large to carry to the GPU machine, so this runs the nvjpeg backend alone there (pil on CPU)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

COLUMNS = ["label", "device", "size", "shorter", "max", "images", "images_per_s", "padding_fraction"]


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dest", metavar="RESULTS", help="results folder")
    parser.add_argument("backend", choices=["nvjpeg", "pil"])
    parser.add_argument("batches", type=int)
    parser.add_argument("batch_size", type=int)
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse(argv)
    from benchmarks.bench_data import make_shards, measure  # numpy, PIL, the loaders: after --help
    from benchmarks.common import write_results

    dest, backend, batches, batch_size = args.dest, args.backend, args.batches, args.batch_size
    device = "cuda" if backend == "nvjpeg" else "cpu"
    config = {"batches": batches, "batch_size": batch_size}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(tmp) / "decode", (batches + 1) * batch_size)
        for size in ("paper", "small"):
            rows.append(dict(measure(shards, backend, device, size, False, batches, batch_size, 4), label=backend))
            write_results("bench_decode", rows, config, dest, COLUMNS, partial=size != "small")
    return rows


if __name__ == "__main__":
    main()
