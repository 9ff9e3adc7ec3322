"""The shard format: round trip, manifest checks, tampering, atomic writes (real JPEGs)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest

from pixelbert_dist.data.format.shards import (
    FORMAT,
    ShardWriter,
    iter_samples,
    iter_shard,
    read_manifest,
    read_skipped,
    write_shard,
)
from pixelbert_dist.data.format.index import ShardFormatError
from tests.fixtures_data import noise_image


def _samples(n: int):
    out = []
    for i in range(n):
        buf = io.BytesIO()
        noise_image(32 + i, 24, seed=i).save(buf, "JPEG", quality=95)
        meta = {
            "key": f"s{i:03d}",
            "captions": [f"caption {i}", "another"],
            "source": "test",
            "image_id": str(i),
            "width": 32 + i,
            "height": 24,
        }
        out.append((f"s{i:03d}", buf.getvalue(), meta))
    return out


def _write(directory, samples, per_shard=3):
    with ShardWriter(directory, "part", per_shard, source="test") as writer:
        for key, jpeg, meta in samples:
            writer.write(key, jpeg, meta)
        writer.skip("broken.jpg", "unreadable image")
    return writer.manifest


def test_round_trip(tmp_path):
    samples = _samples(7)
    manifest = _write(tmp_path, samples)
    assert [s.file for s in manifest.shards] == ["part-000000.tar", "part-000001.tar", "part-000002.tar"]
    assert [s.num_samples for s in manifest.shards] == [3, 3, 1]
    read = read_manifest(tmp_path, verify=True)
    assert read.num_samples == 7
    assert read.skipped == 1
    assert read.source == "test"
    assert read.shards == manifest.shards
    for info in read.shards:
        assert info.sha256 == hashlib.sha256((tmp_path / info.file).read_bytes()).hexdigest()
    assert list(iter_samples(tmp_path)) == samples
    assert read_skipped(tmp_path) == [{"file": "broken.jpg", "reason": "unreadable image"}]
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert raw["format"] == FORMAT
    assert set(raw) == {
        "format",
        "name",
        "num_samples",
        "shards",
        "source",
        "skipped",
        "images_skipped",
        "captions_dropped",
    }


def test_member_layout_and_determinism(tmp_path):
    samples = _samples(2)
    first = write_shard(tmp_path / "a.tar", samples)
    second = write_shard(tmp_path / "b.tar", samples)
    assert first.sha256 == second.sha256, "same samples must give byte-identical shards"
    with tarfile.open(tmp_path / "a.tar") as tar:
        assert tar.getnames() == ["s000.jpg", "s000.json", "s001.jpg", "s001.json"]
        assert all(m.mtime == 0 for m in tar.getmembers())


def test_truncated_shard_is_named(tmp_path):
    _write(tmp_path, _samples(5))
    shard = tmp_path / "part-000001.tar"
    shard.write_bytes(shard.read_bytes()[:700])
    read_manifest(tmp_path)  # without verify only presence is checked
    with pytest.raises(ShardFormatError, match="part-000001.tar.*sha256"):
        read_manifest(tmp_path, verify=True)
    with pytest.raises(ShardFormatError, match="part-000001.tar"):
        list(iter_samples(tmp_path))


def test_modified_byte_and_missing_shard(tmp_path):
    _write(tmp_path, _samples(4))
    shard = tmp_path / "part-000000.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardFormatError, match="part-000000.tar"):
        read_manifest(tmp_path, verify=True)
    (tmp_path / "part-000001.tar").unlink()
    with pytest.raises(ShardFormatError, match="part-000001.tar.*missing"):
        read_manifest(tmp_path)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "manifest.json not found"),
        ("{not json", "not valid JSON"),
        (json.dumps({"format": "other"}), "format is 'other'"),
        (json.dumps({"format": FORMAT, "name": "x"}), "malformed manifest"),
        (json.dumps({"format": FORMAT, "name": "x", "num_samples": 3, "shards": []}), "differs"),
    ],
)
def test_bad_manifest_is_named(tmp_path, content, message):
    if content is not None:
        (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(ShardFormatError, match=message) as info:
        read_manifest(tmp_path)
    assert str(tmp_path / "manifest.json") in str(info.value)


def test_interrupted_writer_leaves_no_finished_look(tmp_path):
    samples = _samples(3)
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, "part", 2) as writer:
            for key, jpeg, meta in samples:
                writer.write(key, jpeg, meta)
            raise RuntimeError("crash")
    assert not (tmp_path / "manifest.json").exists()
    assert not list(tmp_path.glob("*.tmp"))
    assert [p.name for p in tmp_path.glob("*.tar")] == ["part-000000.tar"]


def test_bad_key_and_member_order(tmp_path):
    jpeg = _samples(1)[0][1]
    with pytest.raises(ShardFormatError, match="no dots"):
        write_shard(tmp_path / "x.tar", [("a.b", jpeg, {})])
    assert not list(tmp_path.iterdir()), "a failed write leaves neither shard nor tmp file"
    with tarfile.open(tmp_path / "y.tar", "w") as tar:  # json before jpg: not our layout
        for name in ("k.json", "k.jpg"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(ShardFormatError, match="y.tar.*k.json"):
        list(iter_shard(tmp_path / "y.tar"))
