"""`make_shards.py index DIR` on foreign webdataset shards (the img2dataset-layout set of
tests/foreign_helpers.py): sidecars and a manifest beside the tars, which keep their bytes
and mtimes; rows hold each image's offset, size, CRC and header size; the split then reads
in the indexed mode (pil and DALI, bucketing too) and streams with CRC checks; a crashed
run resumes with the shards it had not finished."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile

import numpy as np
import pytest

from pixelbert_dist.data.builders.cli import main as make_shards
from pixelbert_dist.data.decode.dali import dali_available
from pixelbert_dist.data.format import index as fmt_index
from pixelbert_dist.data.format.foreign_index import PROGRESS, index_foreign
from pixelbert_dist.data.format.shards import read_manifest, read_skipped
from pixelbert_dist.data.loader import build_loader
from tests.data_helpers import data_cfg
from tests.foreign_helpers import FOREIGN_PATTERN, write_img2dataset_set


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    directory = tmp_path_factory.mktemp("indexed")
    expected = write_img2dataset_set(directory)
    before = {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in directory.glob("*")}
    assert make_shards(["index", str(directory), "--workers", "2"]) == 0
    return directory, expected, before


def test_index_writes_beside_the_tars_and_never_rewrites_them(indexed):
    directory, expected, before = indexed
    after = {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in directory.glob("*")}
    assert {name: after[name] for name in before} == before
    assert sorted(set(after) - set(before)) == [
        "00000.idx.npy",
        "00001.idx.npy",
        "00002.idx.npy",
        "manifest.json",
        "skipped.jsonl",
    ]
    manifest = read_manifest(directory, verify=True)  # the sha256 taken while indexing
    assert [s.num_samples for s in manifest.shards] == [29, 29, 20] and manifest.num_samples == len(expected)
    kinds = sorted((e["reason"].split(":")[0], e["kind"]) for e in read_skipped(directory))
    assert kinds == [("no_caption", "image"), ("no_image", "image"), ("truncated_tar", "shard")]
    # two samples left out of the index, one tar read up to its damage: counted apart
    assert (manifest.skipped, manifest.images_skipped, manifest.captions_dropped) == (3, 2, 0)


def test_rows_hold_offset_size_crc_and_header_sizes(indexed):
    directory, _, _ = indexed
    with tarfile.open(directory / "00001.tar") as tar:
        images = [m for m in tar if m.name.rsplit(".", 1)[1] in ("jpg", "png", "webp")]
        wanted = {m.offset_data: tar.extractfile(m).read() for m in images}
        metas = {m.name.partition(".")[0]: json.load(tar.extractfile(m)) for m in tar if m.name.endswith(".json")}
    rows = fmt_index.load(directory / "00001.idx.npy")
    assert rows.shape[1] == len(wanted) == 29
    for col in rows.T:
        data = wanted[int(col[fmt_index.JPG_BLOCK]) * fmt_index.BLOCK]
        assert col[fmt_index.JPG_SIZE] == len(data) and col[fmt_index.CRC32] == fmt_index.crc32(data)
    keys = sorted(metas)
    keys.remove("000010003")  # no image
    widths = [metas[k]["width"] for k in keys]
    assert rows[fmt_index.WIDTH].tolist() == widths
    assert rows[fmt_index.HEIGHT].tolist() == [metas[k]["height"] for k in keys]


@pytest.mark.parametrize("backend", ["pil", "dali"])
def test_indexed_mode_reads_every_sample_with_its_caption(indexed, backend):
    if backend == "dali" and not dali_available():
        pytest.skip("DALI not installed")
    directory, expected, _ = indexed
    loader = build_loader(data_cfg(backend, bucketing=True, seed=3), str(directory), 6)
    keys, captions = [], {}
    for batch in loader:
        keys += [k for k, pad in zip(batch["keys"], batch["is_pad"].tolist()) if not pad]
        captions.update(zip(batch["keys"], batch["captions"]))
    assert sorted(keys) == sorted(expected) and loader.damaged == 0
    assert {k: captions[k] for k in expected} == expected


def test_a_streamed_indexed_set_is_crc_checked(indexed, tmp_path):
    directory, expected, _ = indexed
    changed = tmp_path / "changed"
    shutil.copytree(directory, changed)
    rows = fmt_index.load(changed / "00000.idx.npy")
    at = int(rows[fmt_index.JPG_BLOCK, 3]) * fmt_index.BLOCK + 100  # sample 3's WebP, bytes 100..
    with open(changed / "00000.tar", "r+b") as f:
        f.seek(at)
        data = f.read(8)
        f.seek(at)
        f.write(bytes(b ^ 0x01 for b in data))
    cfg = data_cfg("pil", num_workers=1, epoch_samples=78, shuffle=False, shuffle_buffer=0)  # wraps by one
    loader = build_loader(cfg, f"{changed}/{FOREIGN_PATTERN}", 6)
    keys = [k for batch in loader for k in batch["keys"]]
    assert loader.unchecked is None  # every shard had its sidecar
    assert loader.damaged >= 1 and "000000003" not in keys[:77]
    assert sorted(set(keys)) == sorted(set(expected) - {"000000003"})
    assert loader.skipped == {"no_image": 1, "no_caption": 1, "truncated_tar": 1}


def test_a_crashed_index_run_resumes_with_the_shards_left(tmp_path):
    directory = tmp_path / "set"
    write_img2dataset_set(directory)

    def crash_after_first(record):
        raise KeyboardInterrupt(record["file"])

    with pytest.raises(KeyboardInterrupt):
        index_foreign(directory, workers=1, progress=crash_after_first)
    assert not (directory / "manifest.json").exists()
    assert len((directory / PROGRESS).read_text().splitlines()) == 1
    first = (directory / "00000.idx.npy").stat().st_mtime_ns
    again = []
    manifest = index_foreign(directory, workers=1, progress=lambda r: again.append(r["file"]))
    assert again == ["00001.tar", "00002.tar"] and manifest.num_samples == 78
    assert (directory / "00000.idx.npy").stat().st_mtime_ns == first
    assert not (directory / PROGRESS).exists()
    fresh = tmp_path / "fresh"
    write_img2dataset_set(fresh)
    assert {**index_foreign(fresh, workers=2).to_json(), "name": "set"} == manifest.to_json()
    assert all(
        np.array_equal(fmt_index.load(directory / n), fmt_index.load(fresh / n))
        for n in os.listdir(fresh)
        if ".idx" in n
    )
    assert make_shards(["index", str(directory)]) == 0  # indexed already: nothing to write
    assert make_shards(["index", str(directory), "--force"]) == 0


def test_image_sizes_read_from_headers_match_pil():
    import io

    from PIL import Image

    from pixelbert_dist.data.format.image_size import image_size
    from tests.foreign_helpers import image_bytes

    made = [image_bytes(kind, 37, 53, 1) for kind in ("jpg", "png", "webp")]
    for mode, options in (("RGB", {"lossless": True}), ("RGBA", {"quality": 80}), ("L", {"progressive": True})):
        buf = io.BytesIO()
        image = Image.new(mode, (71, 29), 90)
        image.save(buf, "JPEG" if mode == "L" else "WEBP", **options)  # VP8L, VP8X, progressive JPEG
        made.append(buf.getvalue())
    for data in made:
        assert image_size(data) == Image.open(io.BytesIO(data)).size
    assert image_size(b"GIF89a" + b"\0" * 20) == (0, 0)


def test_a_tar_cut_between_members_is_indexed_up_to_the_cut(tmp_path):
    """tarfile just stops where a header is missing: the missing end-of-archive blocks
    tell the index (and skipped.jsonl) that the tar was cut."""
    write_img2dataset_set(tmp_path)
    with tarfile.open(tmp_path / "00001.tar") as tar:
        cut = [m for m in tar][30].offset  # a header of sample 10 (000010003 has 2 members)
    (tmp_path / "00001.tar").write_bytes((tmp_path / "00001.tar").read_bytes()[:cut])
    manifest = index_foreign(tmp_path, workers=1)
    assert [s.num_samples for s in manifest.shards] == [29, 9, 20]  # 000010003 has no image
    reasons = [e["reason"] for e in read_skipped(tmp_path) if e["file"] == "00001.tar"]
    assert len(reasons) == 1 and reasons[0].startswith("truncated_tar") and "end-of-archive" in reasons[0]


def test_dali_webdataset_reader_refuses_foreign_shards_in_one_line(indexed):
    from pixelbert_dist.config import ConfigError

    directory, _, _ = indexed
    with pytest.raises(ConfigError, match="dali_reader='external'"):
        build_loader(data_cfg("dali", dali_reader="webdataset"), str(directory), 6)
