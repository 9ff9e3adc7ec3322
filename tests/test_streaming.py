"""Streaming mode over real shards: from a local `python -m http.server` (127.0.0.1
only), from `pipe:` commands and from local brace patterns. Unequal shards still give
every rank the same batches, a resumed run (also in resampled mode, also with a JPEG that
does not decode) continues exactly, and a failed read is retried and counted."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from test_loaders import _cfg, _jpeg, mixed_sizes

from pixelbert_dist.data.loader import build_loader
from pixelbert_dist.data.shards import ShardWriter

N, PER_SHARD, BATCH = 22, 6, 3  # shards of 6, 6, 6, 4 samples
PATTERN = "train-{000000..000003}.tar"
UNDECODABLE = b"\xff\xd8" + b"not a JPEG stream " * 8 + b"\xff\xd9"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    directory = tmp_path_factory.mktemp("stream") / "train"
    with ShardWriter(directory, "train", samples_per_shard=PER_SHARD) as writer:
        for i, (height, width) in enumerate(mixed_sizes(N, seed=4)):
            key = f"img{i:04d}"
            writer.write(
                key,
                UNDECODABLE if i == 8 else _jpeg(height, width, i),
                {"key": key, "captions": [f"caption {i} on the left"], "width": width, "height": height},
            )
    return directory


@contextlib.contextmanager
def serve(directory):
    """``python -m http.server`` on 127.0.0.1 over ``directory``; yields its URL."""
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
                urllib.request.urlopen(f"{url}/manifest.json", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(shards):
    with serve(shards) as url:
        yield url


def _stream(spec, rank=0, world_size=2, **kw):
    kw.setdefault("epoch_samples", 24)
    kw.setdefault("shuffle_buffer", 5)
    return build_loader(_cfg("pil", hflip=True, **kw), spec, BATCH, rank=rank, world_size=world_size)


def _same(got, want):
    assert [b["keys"] for b in got] == [b["keys"] for b in want]
    for a, b in zip(got, want):
        for name in ("images", "input_ids", "mlm_labels", "itm_labels"):
            assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_http_equals_local_and_ranks_stay_in_step(shards, server):
    per_rank = []
    for rank in (0, 1):
        http = list(_stream(f"{server}/{PATTERN}", rank=rank))
        local = list(_stream(str(shards / PATTERN), rank=rank))
        _same(http, local)
        assert len(http) == 24 // (2 * BATCH)
        assert all(len(b["keys"]) == BATCH for b in http)
        per_rank.append({k for b in http for k in b["keys"]})
    assert not per_rank[0] & per_rank[1], "ranks read different shards"
    assert "img0008" not in per_rank[0] | per_rank[1]
    with pytest.raises(ValueError, match="4 shards cannot feed 4 ranks x 2 workers.*resampled"):
        _stream(f"{server}/{PATTERN}", world_size=4, num_workers=2)  # fails before step 1


@pytest.mark.slow
@pytest.mark.parametrize("resampled", [False, True])
def test_resume_is_exact(server, resampled):
    spec = f"{server}/{PATTERN}"
    loader = _stream(spec, resampled=resampled, num_workers=2, epoch_samples=36)
    full = [list(loader)]
    loader.set_epoch(1)
    full.append(list(loader))
    assert [b["keys"] for b in full[0]] != [b["keys"] for b in full[1]]
    first = _stream(spec, resampled=resampled, num_workers=2, epoch_samples=36)
    taken = []
    for batch in first:
        taken.append(batch)
        if len(taken) == 3:
            break
    state = json.loads(json.dumps(first.state_dict()))
    fresh = _stream(spec, resampled=resampled, num_workers=2, epoch_samples=36)
    fresh.load_state_dict(state)
    _same(taken + list(fresh), full[0])
    fresh.set_epoch(1)
    _same(list(fresh), full[1])
    with pytest.raises(ValueError, match="num_workers"):
        _stream(spec, resampled=resampled, num_workers=1, epoch_samples=36).load_state_dict(state)


@pytest.mark.slow
def test_pipe_and_a_retried_read(shards, tmp_path):
    local = list(_stream(str(shards / PATTERN), world_size=1, epoch_samples=21))
    marker = tmp_path / "failed-once"
    # the first read of each shard stops after 3000 bytes and exits 1: a transient failure
    command = (
        f"pipe:sh -c 'if [ -e {marker}-$0 ]; then cat {shards}/$0; else touch {marker}-$0; "
        f"head -c 3000 {shards}/$0; exit 1; fi' train-{{000000..000003}}.tar"
    )
    loader = _stream(command, world_size=1, epoch_samples=21)
    _same(list(loader), local)
    assert loader.read_errors == 4
    assert loader.damaged == 1  # img0008 does not decode: skipped, counted


@pytest.mark.slow
def test_a_streamed_position_is_never_replanned_to_another_world_size(shards):
    from pixelbert_dist.train.resume import replan_data_state

    spec = str(shards / PATTERN)
    saved = _stream(spec, world_size=2).state_dict()  # per-rank cursors: no meaning on 1 rank
    one = _stream(spec, world_size=1)
    with pytest.raises(ValueError, match=r"'world_size': \(2, 1\)"):
        one.load_state_dict(replan_data_state(saved, one.state_dict()))
