"""Shard builder gaps (issue 25 item 3): inputs the builders met badly before. A 16-bit
PNG is scaled to 8 bits, a NUL in a caption is cleaned, skipped.jsonl and the manifest
count skipped images and dropped captions apart, a missing --images folder is named, a
jsonl image URL is skipped saying URLs are not fetched, invalid UTF-8 names file and line,
a Karpathy file without val builds the splits it has under its data set's name, an
unknown split value is named, and a rerun with fewer shards leaves no stale sidecar."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixelbert_dist.data.builders import build_coco, build_jsonl
from pixelbert_dist.data.format.shards import iter_samples, read_manifest, read_skipped
from tests.fixtures_data import write_coco, write_image, write_karpathy

FAST = {"samples_per_shard": 4, "workers": 0, "progress": False}
REPO = Path(__file__).resolve().parents[1]


def _jsonl(path, lines) -> str:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def _decoded(jpeg: bytes) -> np.ndarray:
    import io

    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("L"), dtype=np.float64)


def test_16_bit_png_is_scaled_to_8_bits_and_nul_in_a_caption_cleaned(tmp_path):
    grey16 = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)  # 0..64491
    Image.fromarray(grey16).save(tmp_path / "deep.png")
    source = _jsonl(tmp_path / "set.jsonl", [{"image": "deep.png", "caption": "a\x00grey\x1b ramp\x00"}])
    build_jsonl(tmp_path / "out", source, **FAST)
    [(_, jpeg, meta)] = list(iter_samples(tmp_path / "out"))
    assert meta["captions"] == ["a grey ramp"]
    got, want = _decoded(jpeg), grey16 / 257.0
    assert np.abs(got - want).mean() < 2.0  # JPEG rounding; clipped to 255 it would be ~130 off


def test_skipped_jsonl_and_manifest_count_images_and_captions_apart(tmp_path):
    fx = write_coco(tmp_path / "src")
    build_coco(tmp_path / "out", fx["images"], captions_json=fx["captions"], **FAST)
    manifest = read_manifest(tmp_path / "out")
    kinds = [e["kind"] for e in read_skipped(tmp_path / "out")]
    assert (
        (manifest.images_skipped, manifest.captions_dropped) == (4, 4) == (kinds.count("image"), kinds.count("caption"))
    )
    assert manifest.skipped == 8


def test_a_missing_images_folder_is_named_as_such(tmp_path):
    fx = write_coco(tmp_path / "src")
    with pytest.raises(FileNotFoundError, match=r"--images folder .*nowhere not found"):
        build_coco(tmp_path / "out", tmp_path / "nowhere", captions_json=fx["captions"], **FAST)


def test_jsonl_urls_are_skipped_as_not_fetched_and_bad_utf8_names_file_and_line(tmp_path, caplog):
    write_image(tmp_path / "a.jpg", "rgb")
    lines = [{"image": "a.jpg", "caption": "local"}, {"image": "https://example.com/b.jpg", "caption": "remote"}]
    with caplog.at_level(logging.WARNING):
        result = build_jsonl(tmp_path / "out", _jsonl(tmp_path / "set.jsonl", lines), **FAST)["jsonl"]
    assert (result.written, result.images_skipped) == (1, 1)
    [entry] = read_skipped(tmp_path / "out")
    assert entry["file"] == "https://example.com/b.jpg" and "URLs are not fetched" in entry["reason"]
    assert any("URLs are not fetched" in r.getMessage() for r in caplog.records)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"image": "a.jpg", "caption": "ok"}\n{"image": "a.jpg", "caption": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid UTF-8"):
        build_jsonl(tmp_path / "out2", bad, **FAST)


def _karpathy_without(tmp_path, dropped: str, **change) -> dict:
    fx = write_karpathy(tmp_path / "src", flickr=True)
    data = json.loads(fx["karpathy"].read_text())
    data.pop("dataset")  # the name must come from the file's name
    data["images"] = [dict(e, **change) for e in data["images"] if e["split"] != dropped]
    fx["karpathy"].write_text(json.dumps(data))
    return fx


def test_karpathy_without_val_builds_the_splits_it_has_under_its_name(tmp_path, caplog):
    fx = _karpathy_without(tmp_path, "val")
    with caplog.at_level(logging.WARNING):
        results = build_coco(tmp_path / "out", fx["images"], karpathy_json=fx["karpathy"], **FAST)
    assert sorted(results) == ["test", "train"]
    assert not (tmp_path / "out" / "val").exists()
    assert {read_manifest(tmp_path / "out" / s).source for s in results} == {"flickr30k"}
    assert next(iter_samples(tmp_path / "out" / "train"))[0].startswith("flickr30k")
    assert any("no val image" in r.getMessage() for r in caplog.records)


def test_karpathy_unknown_split_value_is_named(tmp_path):
    fx = _karpathy_without(tmp_path, "none", split="dev")
    with pytest.raises(ValueError, match=r"images\[0\] has split 'dev': expected one of"):
        build_coco(tmp_path / "out", fx["images"], karpathy_json=fx["karpathy"], **FAST)


def test_a_rerun_with_fewer_shards_removes_stale_sidecars(tmp_path):
    for i in range(6):
        write_image(tmp_path / f"{i}.jpg", "rgb", seed=i)
    source = _jsonl(tmp_path / "set.jsonl", [{"image": f"{i}.jpg", "caption": f"image {i}"} for i in range(6)])
    build_jsonl(tmp_path / "out", source, samples_per_shard=2, workers=0, progress=False)
    assert len(list((tmp_path / "out").glob("*.idx.npy"))) == 3
    build_jsonl(tmp_path / "out", source, samples_per_shard=4, workers=0, progress=False)
    assert sorted(p.name for p in (tmp_path / "out").glob("jsonl-*")) == [
        "jsonl-000000.idx.npy",
        "jsonl-000000.tar",
        "jsonl-000001.idx.npy",
        "jsonl-000001.tar",
    ]


@pytest.mark.slow
def test_kill_9_of_the_builder_leaves_no_worker_behind(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(REPO / "launch" / "make_shards.py"), "synthetic", "--num", "20000"]
    command += ["--workers", "2", "--samples-per-shard", "500", "--no-progress", "--out", str(tmp_path / "out")]
    builder = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 400  # its start imports torch: minutes on a loaded machine
        while len(psutil.Process(builder.pid).children()) < 2:
            assert time.monotonic() < deadline and builder.poll() is None, "the builder never started its workers"
            time.sleep(0.2)
        workers = psutil.Process(builder.pid).children()
        os.kill(builder.pid, signal.SIGKILL)
        builder.wait(timeout=30)
        gone, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, f"orphaned workers: {alive}"
    finally:
        if builder.poll() is None:
            builder.kill()


def _corrupt_but_decodable(jpeg: bytes) -> bytes:
    """200 bytes of the entropy-coded data XORed, as the issue's case, such that PIL
    still decodes the file without a word (the first seed that does)."""
    import io

    for seed in range(200):
        rng = np.random.default_rng(seed)
        data = bytearray(jpeg)
        for at in rng.choice(np.arange(700, len(data) - 4), 200, replace=False):
            data[at] ^= int(rng.integers(1, 256))
        try:
            Image.open(io.BytesIO(bytes(data))).load()
        except OSError:
            continue
        return bytes(data)
    raise AssertionError("no seed left the JPEG decodable")


def test_a_jpeg_with_corrupt_data_that_still_decodes_is_skipped(tmp_path):
    write_image(tmp_path / "good.jpg", "rgb", seed=1)
    write_image(tmp_path / "src.jpg", "rgb", seed=2)
    (tmp_path / "bad.jpg").write_bytes(_corrupt_but_decodable((tmp_path / "src.jpg").read_bytes()))
    lines = [{"image": "good.jpg", "caption": "good"}, {"image": "bad.jpg", "caption": "bad"}]
    result = build_jsonl(tmp_path / "out", _jsonl(tmp_path / "set.jsonl", lines), **FAST)["jsonl"]
    assert (result.written, result.images_skipped) == (1, 1)
    [entry] = read_skipped(tmp_path / "out")
    assert entry["file"].endswith("bad.jpg") and "corrupt JPEG data" in entry["reason"]
