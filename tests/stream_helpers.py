"""Shared by the streaming tests: the streaming shards (22 samples in shards of 6, 6, 6, 4,
img0008 not a JPEG), a local ``python -m http.server`` over a folder, the stream loaders
they read with and the batch comparisons.

Import as ``from tests.stream_helpers import ...`` (tests run from the repo root).
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import subprocess
import sys
import time
import urllib.request

import torch

from pixelbert_dist.data.loader import build_loader
from pixelbert_dist.data.format.shards import ShardWriter
from tests.data_helpers import MEAN_TOL, data_cfg, make_jpeg, mixed_sizes

N, PER_SHARD, BATCH = 22, 6, 3  # shards of 6, 6, 6, 4 samples
PATTERN = "train-{000000..000003}.tar"
UNDECODABLE = b"\xff\xd8" + b"not a JPEG stream " * 8 + b"\xff\xd9"


def write_stream_shards(directory):
    """The streaming shards in ``directory``; returns it."""
    with ShardWriter(directory, "train", samples_per_shard=PER_SHARD) as writer:
        for i, (height, width) in enumerate(mixed_sizes(N, seed=4)):
            key = f"img{i:04d}"
            writer.write(
                key,
                UNDECODABLE if i == 8 else make_jpeg(height, width, i),
                {"key": key, "captions": [f"caption {i} on the left"], "width": width, "height": height},
            )
    return directory


@contextlib.contextmanager
def serve(directory, probe_file="manifest.json"):
    """``python -m http.server`` on 127.0.0.1 over ``directory``; yields its URL once
    ``probe_file`` is served."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{url}/{probe_file}", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def pil_stream(spec, rank=0, world_size=2, **kw):
    """A pil streaming loader (hflip, a shuffle buffer of 5) for ``rank`` of ``world_size``."""
    kw.setdefault("epoch_samples", 24)
    kw.setdefault("shuffle_buffer", 5)
    return build_loader(data_cfg("pil", hflip=True, **kw), spec, BATCH, rank=rank, world_size=world_size)


def same_batches(got, want):
    """The same keys, pixels and labels, batch by batch."""
    assert [b["keys"] for b in got] == [b["keys"] for b in want]
    for a, b in zip(got, want):
        for name in ("images", "input_ids", "mlm_labels", "itm_labels"):
            assert torch.equal(a[name], b[name]), name


def stream_on(spec, backend, rank=0, **kw):
    """A streaming loader on ``backend`` for ``rank`` of 2 (two workers, hflip, 36 samples an epoch)."""
    kw = {"num_workers": 2, "epoch_samples": 36, "shuffle_buffer": 5, **kw}
    return build_loader(data_cfg(backend, hflip=True, **kw), spec, BATCH, rank=rank, world_size=2)


def read_with_warnings(loader, caplog) -> tuple[list, list]:
    """The loader's batches and the warnings it logged meanwhile."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pixelbert_dist.data"):
        batches = list(loader)
    return batches, [r.getMessage() for r in caplog.records]


def damaged_keys(messages) -> set:
    """The keys that log ``messages`` name as damaged samples."""
    return {m for msg in messages for m in re.findall(r"damaged sample \S+:(img\d+)", msg)}


def batches_agree(dali, pil, exact_images=False):
    """The same keys, text and damage counts; images equal or within decoder rounding."""
    assert [b["keys"] for b in dali] == [b["keys"] for b in pil]
    for a, b in zip(dali, pil):
        for name in ("input_ids", "attention_mask", "mlm_labels", "itm_labels", "image_sizes"):
            assert torch.equal(a[name], b[name]), name
        assert a["damaged"] == b["damaged"]
        assert a["images"].shape == b["images"].shape
        if exact_images:
            assert torch.equal(a["images"], b["images"])
            continue
        for i, (h, w) in enumerate(a["image_sizes"].tolist()):
            diff = (a["images"][i, :, :h, :w] - b["images"][i, :, :h, :w]).abs().mean()
            assert diff < MEAN_TOL, (a["keys"][i], float(diff))
