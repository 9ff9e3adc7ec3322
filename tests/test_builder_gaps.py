"""Shard builder gaps (issue 10 item 4) and the caption-less image source (issue 14 item 4):
a damaged finished shard and a fixed source file on rerun, duplicate ids, VG's two image
folders, empty input, one image spelt three ways, skipped images vs dropped captions."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pixelbert_dist.data.builders import build_coco, build_images, build_jsonl, build_vg
from pixelbert_dist.data.config import DataConfig
from pixelbert_dist.data.loader import images_backend
from pixelbert_dist.data.format.shards import iter_samples, read_manifest, read_skipped, sha256_file
from pixelbert_dist.finetune.data import KeyedImages
from tests.fixtures_data import write_coco, write_image, write_karpathy, write_vg

REPO = Path(__file__).resolve().parents[1]
FAST = {"samples_per_shard": 4, "workers": 0, "progress": False}


def _keys(directory) -> list[str]:
    return [key for key, _, _ in iter_samples(directory)]


def _make_shards(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / "make_shards.py"),
            *map(str, args),
            "--workers",
            "0",
            "--no-progress",
            "--samples-per-shard",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def test_rerun_rebuilds_a_shard_whose_bytes_changed(tmp_path):
    fx = write_coco(tmp_path / "src")
    out = tmp_path / "out"
    build_coco(out, fx["images"], captions_json=fx["captions"], **FAST)
    shard = out / "coco-000001.tar"
    good = sha256_file(shard)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # bit rot: same size, other bytes
    shard.write_bytes(bytes(data))
    again = build_coco(out, fx["images"], captions_json=fx["captions"], **FAST)["coco"]
    assert again.shards_reused == 2, "the damaged shard is rebuilt, the others reused"
    assert sha256_file(shard) == good
    read_manifest(out, verify=True)


@pytest.mark.parametrize("kind", ["missing", "corrupt"])
def test_rerun_notices_a_fixed_source_file(tmp_path, kind):
    fx = write_coco(tmp_path / "src")
    out = tmp_path / "out"
    first = build_coco(out, fx["images"], captions_json=fx["captions"], **FAST)["coco"]
    image_id = next(i for i, k in fx["kinds"].items() if k == kind)
    name = f"{image_id:012d}.jpg"
    assert any(Path(e["file"]).name == name for e in read_skipped(out))
    write_image(fx["images"] / name, "rgb", seed=7)  # the user fixes the file, reruns
    again = build_coco(out, fx["images"], captions_json=fx["captions"], **FAST)["coco"]
    assert again.written == first.written + 1
    assert f"coco{image_id}" in _keys(out)
    assert not any(Path(e["file"]).name == name for e in read_skipped(out))
    assert again.shards_reused == 2, "only the shard holding the fixed file is rebuilt"


def test_karpathy_duplicate_cocoid_is_written_once_with_a_warning(tmp_path, caplog):
    fx = write_karpathy(tmp_path / "src")
    data = json.loads(fx["karpathy"].read_text())
    twice = dict(data["images"][0])  # cocoid 1 (train) again in test: a leak
    data["images"].append({**twice, "split": "test"})
    data["images"].append(dict(data["images"][2]))  # cocoid 3 (val) twice in val
    fx["karpathy"].write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING):
        results = build_coco(tmp_path / "out", fx["images"], karpathy_json=fx["karpathy"], **FAST)
    keys = [k for split in ("train", "val", "test") for k in _keys(tmp_path / "out" / split)]
    assert sorted(keys) == sorted(set(keys))
    assert len(keys) == 6
    assert "coco1" in _keys(tmp_path / "out" / "train")
    assert "coco1" not in _keys(tmp_path / "out" / "test")
    reasons = [e["reason"] for s in ("test", "val") for e in read_skipped(tmp_path / "out" / s)]
    assert sum("duplicate image id" in r for r in reasons) == 2, reasons
    assert results["test"].images_skipped == 1
    assert results["val"].images_skipped == 1
    assert sum("appears at images" in r.getMessage() for r in caplog.records) == 2


def test_vg_duplicate_region_entry_is_one_sample(tmp_path, caplog):
    fx = write_vg(tmp_path / "src")
    regions = json.loads(fx["regions"].read_text())
    fx["regions"].write_text(json.dumps(regions + [regions[0]]))
    with caplog.at_level(logging.WARNING):
        result = build_vg(tmp_path / "out", fx["regions"], fx["image_data"], fx["images"], **FAST)["vg"]
    assert _keys(tmp_path / "out").count("vg1") == 1
    assert result.written == len(fx["expected"])
    assert any("duplicate" in r.getMessage() for r in caplog.records)


def test_vg_image_found_in_the_folder_its_url_does_not_name(tmp_path):
    fx = write_vg(tmp_path / "src")
    vg_100k, vg_100k_2 = fx["images"]
    shutil.move(vg_100k_2 / "1.jpg", vg_100k / "1.jpg")  # url: .../VG_100K_2/1.jpg
    result = build_vg(tmp_path / "out", fx["regions"], fx["image_data"], fx["images"], **FAST)["vg"]
    assert "vg1" in _keys(tmp_path / "out")
    assert result.written == len(fx["expected"])
    assert not any(Path(e["file"]).name == "1.jpg" for e in read_skipped(tmp_path / "out"))


def test_empty_input_is_an_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: no .* line"):
        build_jsonl(tmp_path / "out", empty, **FAST)
    proc = _make_shards("jsonl", "--file", empty, "--out", tmp_path / "out")
    assert proc.returncode == 2
    assert "empty.jsonl" in proc.stderr
    assert not (tmp_path / "out").exists()
    lost = tmp_path / "lost.jsonl"  # lines, but no image behind any of them
    lost.write_text('{"image": "nowhere.jpg", "caption": "a cat"}\n')
    proc = _make_shards("jsonl", "--file", lost, "--out", tmp_path / "lost")
    assert proc.returncode == 1, proc.stderr
    assert "no sample written" in proc.stderr, proc.stderr
    assert "skipped.jsonl" in proc.stderr


def test_jsonl_one_image_three_spellings_is_one_sample(tmp_path):
    write_image(tmp_path / "a.jpg", "rgb")
    lines = [
        ("a.jpg", "one"),
        ("./a.jpg", "two"),
        (str((tmp_path / "a.jpg").resolve()), "three"),
        ("sub/../a.jpg", "four"),
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"image": i, "caption": c}) + "\n" for i, c in lines))
    result = build_jsonl(tmp_path / "out", path, **FAST)["jsonl"]
    samples = list(iter_samples(tmp_path / "out"))
    assert result.written == 1
    assert samples[0][2]["captions"] == ["one", "two", "three", "four"]
    assert samples[0][2]["image_id"] == "a.jpg"


def test_skipped_images_and_dropped_captions_counted_apart(tmp_path):
    fx = write_coco(tmp_path / "src")
    # images lost: corrupt, truncated, missing, and one whose two captions are both empty;
    # captions dropped: those two, one empty caption of a kept image, one for an unknown id
    result = build_coco(tmp_path / "out", fx["images"], captions_json=fx["captions"], **FAST)["coco"]
    assert (result.images_skipped, result.captions_dropped) == (4, 4)
    assert result.skipped == 8 == len(read_skipped(tmp_path / "out"))
    proc = _make_shards("coco", "--captions", fx["captions"], "--images", fx["images"], "--out", tmp_path / "cli")
    assert proc.returncode == 0, proc.stderr
    assert "coco: written 7, skipped 4 image(s), dropped 4 caption(s)" in proc.stdout


def _png(path: Path, seed: int) -> None:
    write_image(path.with_suffix(".jpg"), "rgb", seed=seed).rename(path)  # PIL reads by content


def test_image_only_sources_for_nlvr2_and_vqa_test(tmp_path):
    nlvr2 = tmp_path / "nlvr2"
    for i, rel in enumerate(
        [
            "train/0/train-10-0-img0.png",
            "train/1/train-10-0-img1.png",
            "dev/dev-850-0-img0.png",
            "dev/dev-850-0-img1.png",
        ]
    ):
        _png(nlvr2 / rel, i)
    write_image(nlvr2 / "dev" / "notes.jpg", "rgb")
    results = build_images(tmp_path / "n_out", [nlvr2 / "train", nlvr2 / "dev"], "nlvr2", **FAST)
    assert results["nlvr2_images"].written == 4
    assert results["nlvr2_images"].images_skipped == 1
    assert sorted(_keys(tmp_path / "n_out")) == [
        "dev-850-0-img0",
        "dev-850-0-img1",
        "train-10-0-img0",
        "train-10-0-img1",
    ]
    test2015 = tmp_path / "test2015"
    for image_id in (1, 57, 581929):
        write_image(test2015 / f"COCO_test2015_{image_id:012d}.jpg", "rgb", seed=image_id)
    proc = _make_shards("images", "--kind", "coco", "--images", test2015, "--out", tmp_path / "c_out")
    assert proc.returncode == 0, proc.stderr
    assert "coco_images: written 3, skipped 0 image(s), dropped 0 caption(s)" in proc.stdout
    images = KeyedImages([str(tmp_path / "c_out"), str(tmp_path / "n_out")])
    assert {"coco1", "coco57", "coco581929", "dev-850-0-img1"} <= set(images.position)
    data = DataConfig(
        train_shards=str(tmp_path / "c_out"), backend="pil", num_workers=0, image_shorter=32, image_max=64
    )
    backend = images_backend(data, images, 2, torch.device("cpu"))
    work = [[(images.position["coco57"], False), (images.position["dev-850-0-img0"], False)]]
    pixels, sizes = next(iter(backend.batches(work)))
    assert pixels.shape[0] == 2
    assert pixels.abs().sum() > 0
    assert sizes.shape[0] == 2
