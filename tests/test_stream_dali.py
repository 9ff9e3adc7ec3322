"""Streaming with data.backend=dali (a real DALI CPU pipeline fed through its external
source) against the pil streaming loader, on the same real shards served by a local
`python -m http.server`: the same batches, images within decoder rounding, exact resume
(also from a pil loader's state), and damaged JPEGs skipped and counted alike, among them
one that DALI alone would decode into garbage without an error, and a GIF that only PIL
decodes (DALI's batch fails; PIL decodes that batch)."""

from __future__ import annotations

import io
import json
from collections import deque

import pytest
from PIL import Image

from pixelbert_dist.data.decode.dali import DaliImages
from pixelbert_dist.data.loader import build_loader
from pixelbert_dist.data.format.shards import ShardWriter
from pixelbert_dist.data.decode.stream_pixels import JpegCheck, StreamImages, TorchJpegPixels
from pixelbert_dist.data.decode.torch_loader import PilDecode, TorchJpegImages
from tests.data_helpers import MAX, SHORTER, data_cfg, make_jpeg, mixed_sizes
from tests.stream_helpers import (
    BATCH,
    PATTERN,
    PER_SHARD,
    UNDECODABLE,
    batches_agree,
    damaged_keys,
    read_with_warnings,
    serve,
    stream_on,
)

N = 22  # shards of 6, 6, 6, 4 samples
DAMAGED = {"img0002", "img0009", "img0015"}  # not a JPEG, 64 bytes xored, cut in half
GIF = "img0020"


def _sample_bytes(i: int, height: int, width: int) -> bytes:
    jpeg = make_jpeg(height, width, i)
    if i == 2:
        return UNDECODABLE
    if i == 9:  # same size; PIL: "broken data stream", DALI: an image, libjpeg warnings only
        data, middle = bytearray(jpeg), len(jpeg) // 2
        data[middle : middle + 64] = bytes(b ^ 0x5A for b in data[middle : middle + 64])
        return bytes(data)
    if i == 15:
        return jpeg[: len(jpeg) // 2]
    if i == 20:
        buf = io.BytesIO()
        Image.open(io.BytesIO(jpeg)).convert("RGB").save(buf, "GIF")
        return buf.getvalue()
    return jpeg


@pytest.fixture(scope="module")
def damaged_shards(tmp_path_factory):
    directory = tmp_path_factory.mktemp("stream-dali") / "train"
    with ShardWriter(directory, "train", samples_per_shard=PER_SHARD) as writer:
        for i, (height, width) in enumerate(mixed_sizes(N, seed=4)):
            key = f"img{i:04d}"
            meta = {"key": key, "captions": [f"caption {i} on the left"], "width": width, "height": height}
            writer.write(key, _sample_bytes(i, height, width), meta)
    return directory


@pytest.fixture(scope="module")
def http(damaged_shards):
    with serve(damaged_shards) as url:
        yield f"{url}/{PATTERN}"


@pytest.mark.slow
def test_the_check_fails_where_pil_fails_and_dali_would_not():
    check, pil = JpegCheck(), PilDecode(SHORTER, MAX)
    sizes = mixed_sizes(N, seed=4)
    for i in (2, 9, 15):
        data = _sample_bytes(i, *sizes[i])
        with pytest.raises(ValueError, match=f"cannot decode JPEG img{i:04d}"):
            pil(data, False, f"img{i:04d}")
        with pytest.raises(ValueError, match=f"cannot decode JPEG img{i:04d}"):
            check(data, False, f"img{i:04d}")
    for i in (0, 1, 20):
        data = _sample_bytes(i, *sizes[i])
        assert check(data, True, "ok") is data
        pil(data, True)
    # DALI itself decodes sample 9 without an error: only the check keeps it out
    failures: list = []
    feed = iter([("img0009", [_sample_bytes(9, *sizes[9])], [False])])
    decoded = list(DaliImages(None, 1, SHORTER, MAX).decode(feed, deque(), failures))
    assert len(decoded) == 1 and not failures


@pytest.mark.slow
def test_dali_stream_equals_pil_stream(http, caplog):
    named, keys, fallbacks = set(), set(), []
    for rank in (0, 1):
        pil_loader = stream_on(http, "pil", rank=rank)
        pil, pil_log = read_with_warnings(pil_loader, caplog)
        dali_loader = stream_on(http, "dali", rank=rank)
        dali, dali_log = read_with_warnings(dali_loader, caplog)
        assert dali_loader.backend == "dali-cpu-stream"
        assert len(dali) == 36 // (2 * BATCH) and all(len(b["keys"]) == BATCH for b in dali)
        batches_agree(dali, pil)
        assert dali_loader.damaged == pil_loader.damaged
        assert damaged_keys(dali_log) == damaged_keys(pil_log)
        named |= damaged_keys(dali_log)
        keys |= {k for b in dali for k in b["keys"]}
        fell_back = [m for m in dali_log if "decoded with PIL" in m]  # the batches holding the GIF
        assert len(fell_back) == sum(GIF in b["keys"] for b in dali)
        assert all(GIF in m for m in fell_back), fell_back
        fallbacks += fell_back
    assert named == DAMAGED  # every kind met, none reached a batch
    assert not keys & DAMAGED
    assert GIF in keys
    assert fallbacks


@pytest.mark.slow
def test_dali_stream_resume_is_exact(http, caplog):
    kw = {"epoch_samples": 48}
    loader = stream_on(http, "dali", **kw)
    full = [list(loader)]
    loader.set_epoch(1)
    full.append(list(loader))
    assert sum(b["damaged"] for b in full[0]) > 0
    first, taken = stream_on(http, "dali", **kw), []
    for batch in first:
        taken.append(batch)
        if len(taken) == 3:
            break
    state = json.loads(json.dumps(first.state_dict()))
    fresh = stream_on(http, "dali", **kw)
    fresh.load_state_dict(state)
    batches_agree(taken + list(fresh), full[0], exact_images=True)
    fresh.set_epoch(1)
    batches_agree(list(fresh), full[1], exact_images=True)
    # the state names stream positions, not a backend: a pil run resumes on dali
    pil = stream_on(http, "pil", **kw)
    for k, _ in enumerate(pil):
        if k == 2:
            break
    from_pil = stream_on(http, "dali", **kw)
    from_pil.load_state_dict(json.loads(json.dumps(pil.state_dict())))
    batches_agree(list(from_pil), full[0][3:], exact_images=True)


@pytest.mark.slow
def test_torchvision_decoder_stream_equals_pil_stream(damaged_shards):
    """The nvjpeg backend's streaming path (``TorchJpegPixels`` over
    ``TorchJpegImages.decode``), with torchvision's CPU decoder on this machine."""
    spec = str(damaged_shards / PATTERN)
    pil = list(stream_on(spec, "pil"))
    loader = stream_on(spec, "dali")
    decoder = TorchJpegImages(None, BATCH, SHORTER, MAX, device="cpu")
    loader.images = StreamImages(decoder.name, JpegCheck(), TorchJpegPixels(decoder, PilDecode(SHORTER, MAX)))
    batches_agree(list(loader), pil)


def test_dali_webdataset_reader_refuses_streamed_shards(damaged_shards):
    cfg = data_cfg("dali", dali_reader="webdataset", shuffle=False, epoch_samples=24)
    with pytest.raises(ValueError, match="external source.*dali_reader='external'"):
        build_loader(cfg, str(damaged_shards / PATTERN), BATCH)


@pytest.mark.slow
def test_dali_stream_retries_a_failed_read_and_names_a_lost_one(damaged_shards, tmp_path):
    local = list(stream_on(str(damaged_shards / PATTERN), "pil"))
    marker = tmp_path / "failed-once"
    # the first read of each shard stops after 3000 bytes and exits 1: a transient failure
    flaky = (
        f"pipe:sh -c 'if [ -e {marker}-$0 ]; then cat {damaged_shards}/$0; else touch {marker}-$0; "
        f"head -c 3000 {damaged_shards}/$0; exit 1; fi' {PATTERN}"
    )
    loader = stream_on(flaky, "dali")
    batches_agree(list(loader), local)
    assert loader.read_errors == 2  # rank 0 of 2 reads two shards, each failed once
    # a shard that never reads through: the error reaches the caller, after the batches before it
    lost = f"pipe:sh -c 'head -c 3000 {damaged_shards}/$0; exit 1' {PATTERN}"
    with pytest.raises(OSError, match=r"train-00000\d\.tar.*read failed 2 times"):
        list(stream_on(lost, "dali", stream_retries=1))
