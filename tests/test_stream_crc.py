"""The index check of streamed shards, over a local `python -m http.server`: a JPEG whose
bytes changed in place after the shard was written, in a way PIL still decodes, is
caught by the CRC32 of the shard's index sidecar and skipped, counted and named alike on
the pil and dali streaming backends, with exact resume; shards without a sidecar stream
as before (said once); a sidecar that is not right stops the run naming it, and a stream
that ends before the samples its sidecar lists is retried, then named."""

from __future__ import annotations

import io
import json
import logging
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from pixelbert_dist.data.format import index as shard_index
from pixelbert_dist.data.format.index import BLOCK, JPG_BLOCK, JPG_SIZE, ShardFormatError
from pixelbert_dist.data.decode.stream_pixels import JpegCheck
from tests.stream_helpers import (
    PATTERN,
    batches_agree,
    damaged_keys,
    pil_stream,
    read_with_warnings,
    serve,
    stream_on,
    write_stream_shards,
)

CHANGED = "img0003"  # in train-000000.tar; img0008 of the same shards does not decode at all
SHARD, ROW = "train-000000", 3


def _changed_but_decodes(jpeg: bytes) -> bytes:
    """``jpeg`` with 4 bytes of its entropy-coded data xored, at the first place from the
    middle on where that makes no marker and PIL still decodes it (libjpeg only warns)."""
    sos = jpeg.index(b"\xff\xda")
    coded = sos + 2 + int.from_bytes(jpeg[sos + 2 : sos + 4], "big")
    for at in range((coded + len(jpeg)) // 2, len(jpeg) - 8):
        changed = bytearray(jpeg)
        changed[at : at + 4] = bytes(b ^ 0x5A for b in jpeg[at : at + 4])
        if 0xFF in jpeg[at - 1 : at + 5] or 0xFF in changed[at : at + 4]:
            continue  # no marker made or broken
        try:
            _pixels(bytes(changed))
        except OSError:
            continue
        return bytes(changed)
    raise AssertionError("no change found that PIL decodes")


def _pixels(jpeg: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(jpeg)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_stream_shards(tmp_path_factory.mktemp("stream") / "train")


@pytest.fixture(scope="module")
def changed(shards, tmp_path_factory):
    """A copy of the streaming shards with ``CHANGED``'s JPEG altered in place (same tar size)."""
    directory = tmp_path_factory.mktemp("stream-crc") / "train"
    shutil.copytree(shards, directory)
    tar = directory / f"{SHARD}.tar"
    column = shard_index.load(directory / f"{SHARD}.idx.npy")[:, ROW]
    at, size = int(column[JPG_BLOCK]) * BLOCK, int(column[JPG_SIZE])
    with open(tar, "r+b") as f:
        f.seek(at - BLOCK)
        assert shard_index.header_key(f.read(BLOCK)) == CHANGED
        jpeg = f.read(size)
        damaged = _changed_but_decodes(jpeg)
        f.seek(at)
        f.write(damaged)
    # what decoding alone would let through: an image, different from the one written
    assert JpegCheck()(damaged, False, CHANGED) is damaged
    assert np.abs(_pixels(damaged) - _pixels(jpeg)).mean() > 5  # grey levels: garbage
    assert tar.stat().st_size == (shards / f"{SHARD}.tar").stat().st_size
    return directory


@pytest.fixture(scope="module")
def http(changed):
    with serve(changed) as url:
        yield f"{url}/{PATTERN}"


@pytest.mark.slow
def test_changed_bytes_that_decode_are_skipped_alike_on_pil_and_dali(http, caplog):
    named, keys, damaged = set(), set(), 0
    for rank in (0, 1):
        pil_loader = stream_on(http, "pil", rank=rank)
        pil, pil_log = read_with_warnings(pil_loader, caplog)
        dali_loader = stream_on(http, "dali", rank=rank)
        dali, dali_log = read_with_warnings(dali_loader, caplog)
        batches_agree(dali, pil)
        assert dali_loader.damaged == pil_loader.damaged
        assert damaged_keys(dali_log) == damaged_keys(pil_log)
        named |= damaged_keys(pil_log)
        keys |= {k for b in pil for k in b["keys"]}
        damaged += pil_loader.damaged
        said = [m for m in pil_log if f":{CHANGED}:" in m]
        assert all("checksum mismatch (bytes changed after the shard was written)" in m for m in said)
        assert all(f"/{SHARD}.tar:{CHANGED}" in m for m in said)
        assert not any("no index sidecar" in m for m in pil_log + dali_log)
    assert named == {CHANGED, "img0008"}  # the CRC's catch and the decoder's
    assert not keys & named
    assert damaged >= 2


@pytest.mark.slow
def test_resume_over_a_changed_jpeg_is_exact(http, caplog):
    kw = {"epoch_samples": 48}
    rank = next(
        r
        for r in (0, 1)
        if CHANGED in damaged_keys(read_with_warnings(stream_on(http, "pil", rank=r, **kw), caplog)[1])
    )
    full = list(stream_on(http, "pil", rank=rank, **kw))
    for cut in (1, 4):  # the worker that reads train-000000 cycles it: the changed JPEG on both sides of a cut
        pil = stream_on(http, "pil", rank=rank, **kw)
        for k, _ in enumerate(pil):
            if k == cut - 1:
                break
        state = json.loads(json.dumps(pil.state_dict()))
        for backend in ("pil", "dali"):
            fresh = stream_on(http, backend, rank=rank, **kw)
            fresh.load_state_dict(state)
            rest, said = read_with_warnings(fresh, caplog)
            batches_agree(rest, full[cut:], exact_images=backend == "pil")
            assert CHANGED in damaged_keys(said)


@pytest.mark.slow
def test_shards_without_a_sidecar_stream_as_before_and_say_so_once(shards, changed, tmp_path, caplog):
    bare = tmp_path / "train"
    shutil.copytree(changed, bare, ignore=shutil.ignore_patterns("*.idx.npy"))
    with serve(bare) as url, serve(shards) as clean:
        loader = pil_stream(f"{url}/{PATTERN}", world_size=1, num_workers=2, epoch_samples=30)
        with caplog.at_level(logging.WARNING, logger="pixelbert_dist.data"):
            got = list(loader)
            loader.set_epoch(1)
            got += list(loader)
        said = [r.getMessage() for r in caplog.records if "no index sidecar" in r.getMessage()]
        assert len(said) == 1, said  # once per run, not per shard or epoch
        assert f"none at {url}/train-00000" in said[0] and ".idx.npy" in said[0]
        # decode-only: the changed JPEG trains, in the place the clean one has in a stream of the clean shards
        want = pil_stream(f"{clean}/{PATTERN}", world_size=1, num_workers=2, epoch_samples=30)
        reference = list(want)
        want.set_epoch(1)
        reference += list(want)
    assert [b["keys"] for b in got] == [b["keys"] for b in reference]
    assert CHANGED in {k for b in got for k in b["keys"]}
    assert loader.damaged == want.damaged  # only img0008, which does not decode


@pytest.mark.slow
def test_a_sidecar_that_is_wrong_stops_the_run_naming_it(changed, tmp_path):
    bad = tmp_path / "train"
    shutil.copytree(changed, bad)
    (bad / "train-000001.idx.npy").write_bytes(b"\x93NUMPY not an index")
    np.save(bad / "train-000002.idx.npy", shard_index.load(bad / "train-000002.idx.npy", mmap=False)[:4])  # 4 fields
    shutil.copy(changed / "train-000000.idx.npy", bad / "train-000003.idx.npy")  # another shard's
    with serve(bad) as url:
        for shard, error in (
            ("000001", r"not a shard index \(19 bytes"),
            ("000002", r"not a shard index \(dtype uint32, shape \(4, 6\)"),
            ("000003", r"does not describe its shard .*/train-000003\.tar: no sample starts at byte \d+"),
        ):
            loader = pil_stream(f"{url}/train-{shard}.tar", world_size=1, num_workers=0, epoch_samples=3)
            with pytest.raises(ShardFormatError, match=re.escape(f"{url}/train-{shard}.idx.npy") + ".*" + error):
                next(iter(loader))
            assert loader.read_errors == 0  # a wrong sidecar stays wrong: never retried
        # the sidecars that fit still check their shards
        assert len(list(pil_stream(f"{url}/train-000000.tar", world_size=1, num_workers=0, epoch_samples=3))) == 1


@pytest.mark.slow
def test_a_stream_shorter_than_its_index_is_retried_then_named(changed, tmp_path):
    short = tmp_path / "train"
    shutil.copytree(changed, short)
    index = shard_index.load(short / "train-000001.idx.npy", mmap=False)
    json_end = int(index[shard_index.JSON_BLOCK, 2]) * BLOCK + int(index[shard_index.JSON_SIZE, 2])
    with open(short / "train-000001.tar", "r+b") as f:  # cut after sample 3's JSON: a tar that ends cleanly
        f.truncate(-(-json_end // BLOCK) * BLOCK)
    with serve(short) as url:
        loader = pil_stream(f"{url}/train-000001.tar", world_size=1, num_workers=0, epoch_samples=6, stream_retries=1)
        with pytest.raises(OSError, match=r"read failed 2 times, last: .*ended after 3 of the 6 samples its index"):
            list(loader)
