"""Does a checkpoint's upload to the S3 mirror delay the next save? Side by side.

    python -m torch.distributed.run --standalone --nproc_per_node 1 \\
        -m benchmarks.bench_mirror --preset tiny --pairs 3 --gap 1.0 --out DIR

moto's S3 server runs in a subprocess (the object store the tests use). Two ways of
mirroring, in alternating pairs of async saves (``--gap`` seconds of "training" between
the two saves of a pair, all uploads finished between pairs):

* ``inline``: the upload runs in the save's background job, as before this change, so the
  next save's wait for the previous save includes its upload;
* ``thread``: ``Mirror.push_later``, an upload thread of its own (the code now).

For the second save of each pair: ``blocked`` (how long ``Checkpointer.save`` held the
step loop) next to ``own`` (its host copy plus the previous save's local writing left
after the gap). Rank 0 writes ``mirror_saves.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.bench_checkpoint import build_engine
from pixelbert_dist.train.run import close_started_group

if TYPE_CHECKING:
    from pixelbert_dist.checkpoint.checkpointer import Checkpointer


def saver_kinds() -> dict[str, type[Checkpointer]]:
    """The two savers compared, by mode. Built here, not at the top of the module, so
    --help answers without importing torch and DeepSpeed (Checkpointer imports both)."""
    from pixelbert_dist.checkpoint import engine_io
    from pixelbert_dist.checkpoint.checkpointer import Checkpointer
    from pixelbert_dist.checkpoint.layout import tag_for

    class InlineMirror(Checkpointer):
        """The code before: the mirror's upload inside the save's background job."""

        def _write(self, staged, record: dict, group) -> None:
            engine_io.write_and_commit(staged, record, self.keep_last, group)
            self.local_done = {**getattr(self, "local_done", {}), record["step"]: time.perf_counter()}
            self.mirror.push(self.folder / tag_for(record["step"]))

    class Threaded(Checkpointer):
        """The code now, noting when each save's local writing and commit ended."""

        def _write(self, staged, record: dict, group) -> None:
            engine_io.write_and_commit(staged, record, self.keep_last, group)
            self.local_done = {**getattr(self, "local_done", {}), record["step"]: time.perf_counter()}
            self.mirror.push_later(self.folder / tag_for(record["step"]))

    return {"inline": InlineMirror, "thread": Threaded}


def start_moto() -> subprocess.Popen:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return server
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("moto's S3 server did not start")


def one_pair(saver: Checkpointer, step: int, gap: float) -> dict:
    saver.save(step, {"trainer": {"step": step}})
    time.sleep(gap)  # the steps between two saves
    called = time.perf_counter()
    saver.save(step + 1, {"trainer": {"step": step + 1}})
    blocked, copy = saver.last_blocked_seconds, saver.last_copy_seconds
    local_left = max(0.0, saver.local_done[step] - called)  # the previous save's local writing still to go
    saver.wait()
    saver.mirror.wait()
    own = copy + local_left
    return {"blocked_s": blocked, "copy_s": copy, "own_s": own, "beyond_own_s": blocked - own}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--pairs", type=int, default=3, help="pairs of saves per mode")
    parser.add_argument("--gap", type=float, default=1.0, help="seconds between the two saves of a pair")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from pixelbert_dist.distributed.env import init_distributed

    server = start_moto()
    try:
        import s3fs

        s3fs.S3FileSystem().makedirs("bench", exist_ok=True)
        init_distributed()
        engine = build_engine(args.preset, 1)
        rows, kinds = [], saver_kinds()
        for pair in range(args.pairs):
            for mode, kind in kinds.items():
                work = args.out / "work" / mode
                saver = kind(work, keep_last=1, async_save=True, mirror=f"s3://bench/{mode}")
                saver.attach(engine)
                rows.append({"mode": mode, "pair": pair, **one_pair(saver, 10 * pair + 1, args.gap)})
                saver.close()
                print(json.dumps(rows[-1]))
    finally:
        server.terminate()
        shutil.rmtree(args.out / "work", ignore_errors=True)
    median = {m: statistics.median(r["beyond_own_s"] for r in rows if r["mode"] == m) for m in ("inline", "thread")}
    summary = {"preset": args.preset, "gap_s": args.gap, "median_blocked_beyond_own_s": median}
    print(json.dumps(summary, indent=2))
    (args.out / "mirror_saves.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
    close_started_group()
