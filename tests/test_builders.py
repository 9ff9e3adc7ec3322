"""Shard builders on tiny fixtures in the official formats, with bad inputs; the CLI."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pixelbert_dist.data.builders import build_coco, build_jsonl, build_synthetic, build_vg
from pixelbert_dist.data.builders.synthetic import COLORS, SHAPES
from pixelbert_dist.data.format.shards import iter_samples, read_manifest, read_skipped
from pixelbert_dist.data.text import load_tokenizer
from tests.fixtures_data import BLUE, RED, write_coco, write_jsonl, write_karpathy, write_vg

REPO = Path(__file__).resolve().parents[1]
FAST = {"samples_per_shard": 4, "workers": 0, "progress": False}


def _read(directory) -> dict[str, tuple[Image.Image, dict]]:
    read_manifest(directory, verify=True)
    out = {}
    for key, jpeg, meta in iter_samples(directory):
        image = Image.open(io.BytesIO(jpeg))
        image.load()
        assert image.format == "JPEG"
        assert image.mode == "RGB"
        assert not image.info.get("progressive"), "shards hold baseline JPEGs"
        assert (image.width, image.height) == (meta["width"], meta["height"])
        assert meta["key"] == key
        assert meta["captions"]
        assert all(c.strip() for c in meta["captions"])
        out[key] = (image, meta)
    return out


def _assert_skipped(directory, bad: dict[str, str]):
    skipped = read_skipped(directory)
    for name, word in bad.items():
        reasons = [e["reason"] for e in skipped if Path(e["file"]).name == name]
        assert reasons, (name, word, skipped)
        assert any(word in r for r in reasons), (name, word, skipped)
    assert read_manifest(directory).skipped == len(skipped)


def _assert_upright(image: Image.Image):
    """The two-tone fixture turned by its EXIF tag: 20x40, red on top, blue below."""
    assert image.size == (20, 40)
    top, bottom = image.getpixel((10, 8)), image.getpixel((10, 32))
    assert all(abs(a - b) < 40 for a, b in zip(top, RED)), top
    assert all(abs(a - b) < 40 for a, b in zip(bottom, BLUE)), bottom


def test_coco_captions(tmp_path):
    fx = write_coco(tmp_path / "src")
    result = build_coco(tmp_path / "out", fx["images"], captions_json=fx["captions"], **FAST)["coco"]
    samples = _read(tmp_path / "out")
    assert {k: m["captions"] for k, (_, m) in samples.items()} == {
        f"coco{i}": caps for i, caps in fx["expected"].items()
    }
    assert result.written == len(fx["expected"]) == 7
    _assert_skipped(tmp_path / "out", fx["bad"])
    assert any("424242" in e["reason"] for e in read_skipped(tmp_path / "out"))
    by_kind = {kind: samples[f"coco{i}"][0] for i, kind in fx["kinds"].items() if f"coco{i}" in samples}
    _assert_upright(by_kind["exif"])
    assert by_kind["cmyk"].getpixel((5, 5))[0] > 200 > by_kind["cmyk"].getpixel((5, 5))[1]
    assert by_kind["png"].size == (30, 20)
    assert by_kind["png"].getpixel((5, 5))[1] > 150
    _assert_upright(by_kind["palette"].rotate(-90, expand=True))
    gray = by_kind["gray"].getpixel((3, 3))
    assert max(gray) - min(gray) <= 3, "a grayscale image stays gray in RGB"


def test_rerun_skips_finished_shards(tmp_path):
    fx = write_coco(tmp_path / "src")
    out = tmp_path / "out"
    first = build_coco(out, fx["images"], captions_json=fx["captions"], **FAST)["coco"]
    manifest = (out / "manifest.json").read_text()
    shards = sorted(out.glob("*.tar"))
    assert len(shards) == 3
    assert first.shards_reused == 0
    stamps = {p: p.stat().st_mtime_ns for p in shards}
    (out / ".progress" / "coco-000001.tar.json").unlink()  # as if killed after that shard
    again = build_coco(out, fx["images"], captions_json=fx["captions"], **FAST)["coco"]
    assert again.shards_reused == 2
    assert again.written == first.written
    assert (out / "manifest.json").read_text() == manifest
    assert [p for p in shards if p.stat().st_mtime_ns != stamps[p]] == [out / "coco-000001.tar"]
    assert read_skipped(out)
    assert read_manifest(out, verify=True).skipped == first.skipped


@pytest.mark.parametrize("flickr", [False, True])
def test_karpathy_splits(tmp_path, flickr):
    fx = write_karpathy(tmp_path / "src", flickr=flickr)
    results = build_coco(tmp_path / "out", fx["images"], karpathy_json=fx["karpathy"], **FAST)
    assert set(results) == {"train", "val", "test"}
    for split, expected in fx["expected"].items():
        samples = _read(tmp_path / "out" / split)
        assert {m["image_id"]: m["captions"] for _, m in samples.values()} == expected
        assert {m["source"] for _, m in samples.values()} == {"flickr30k" if flickr else "coco"}
    assert len(fx["expected"]["train"]) == 3, "restval goes to train"


def test_visual_genome(tmp_path):
    fx = write_vg(tmp_path / "src")
    result = build_vg(tmp_path / "out", fx["regions"], fx["image_data"], fx["images"], **FAST)["vg"]
    samples = _read(tmp_path / "out")
    assert {int(m["image_id"]): m["captions"] for _, m in samples.values()} == fx["expected"]
    assert all("coco_id" in m for _, m in samples.values())
    assert result.written == len(fx["expected"]) == 4
    _assert_upright(samples["vg2"][0])
    _assert_skipped(tmp_path / "out", {**fx["bad"], "6.jpg": "empty caption"})


def test_jsonl_merges_captions(tmp_path):
    fx = write_jsonl(tmp_path / "src")
    build_jsonl(tmp_path / "out", fx["file"], **FAST)
    samples = _read(tmp_path / "out")
    assert {m["image_id"]: m["captions"] for _, m in samples.values()} == fx["expected"]
    _assert_skipped(tmp_path / "out", fx["bad"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.jpg", "caption": "ok"}\n{"caption": "no image"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        build_jsonl(tmp_path / "out2", bad, **FAST)


def test_malformed_coco_file_is_named(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text('{"images": []}')
    with pytest.raises(ValueError, match=r"captions.json.*annotations"):
        build_coco(tmp_path / "out", tmp_path, captions_json=path, **FAST)


def _shard_hashes(directory) -> list[str]:
    return [s.sha256 for s in read_manifest(directory).shards]


def test_synthetic_deterministic_and_describes_its_images(tmp_path):
    kw = {"num": 20, "val_fraction": 0.25, "min_size": 64, "max_size": 128, "samples_per_shard": 6, "progress": False}
    a = build_synthetic(tmp_path / "a", seed=3, workers=0, **kw)
    build_synthetic(tmp_path / "b", seed=3, workers=2, **kw)
    build_synthetic(tmp_path / "c", seed=4, workers=0, **kw)
    assert (a["train"].written, a["val"].written) == (15, 5)
    for split in ("train", "val"):
        assert _shard_hashes(tmp_path / "a" / split) == _shard_hashes(tmp_path / "b" / split)
        assert _shard_hashes(tmp_path / "a" / split) != _shard_hashes(tmp_path / "c" / split)
    tok = load_tokenizer()
    samples = _read(tmp_path / "a" / "train")
    assert 64 <= min(m["width"] for _, m in samples.values())
    assert len({(m["width"], m["height"]) for _, m in samples.values()}) > 5, "varied aspect ratios"
    for image, meta in samples.values():
        assert 1 <= len(meta["objects"]) <= 3
        assert len(meta["captions"]) >= 3
        for caption in meta["captions"]:
            assert "[UNK]" not in tok.tokenize(caption), caption
        for obj in meta["objects"]:
            assert obj["shape"] in SHAPES
            assert all(obj["color"] in c for c in meta["captions"][:3])
            pixel = image.getpixel((obj["x"], obj["y"]))  # a shape's centre shows its colour
            assert all(abs(p - q) < 40 for p, q in zip(pixel, COLORS[obj["color"]])), (meta, pixel)


def test_cli_synthetic(tmp_path):
    out = tmp_path / "syn"
    cmd = [
        sys.executable,
        str(REPO / "launch" / "make_shards.py"),
        "synthetic",
        "--out",
        str(out),
        "--num",
        "50",
        "--workers",
        "0",
        "--no-progress",
        "--samples-per-shard",
        "20",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "train: written 45, skipped 0" in proc.stdout
    assert "val: written 5, skipped 0" in proc.stdout
    assert read_manifest(out / "train", verify=True).num_samples == 45
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert "3 finished shard(s) reused" in again.stdout
    missing = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / "make_shards.py"),
            "jsonl",
            "--file",
            str(tmp_path / "none.jsonl"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2
    assert "none.jsonl" in missing.stderr
