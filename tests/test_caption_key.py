"""``data.caption_key`` in the indexed mode: the project's own shards read the named JSON
field on every backend (pil, DALI's external source, DALI's webdataset reader); foreign
shards indexed by ``make_shards.py index`` for the default rule (rows point at the
``.txt``) refuse a JSON field in one line that says how to index them for it."""

from __future__ import annotations

import pytest

from pixelbert_dist.config import ConfigError
from pixelbert_dist.data.builders.cli import main as make_shards
from pixelbert_dist.data.format.index import ShardFormatError
from pixelbert_dist.data.format.shards import ShardWriter
from pixelbert_dist.data.loader import build_loader
from tests.data_helpers import data_cfg, make_jpeg
from tests.foreign_helpers import write_img2dataset_set

N = 8


def write_alt_split(directory, without_alt: int | None = None):
    """Samples whose JSON has ``captions`` and an ``alt`` field (but sample ``without_alt``)."""
    with ShardWriter(directory, "train", samples_per_shard=3) as writer:
        for i in range(N):
            key = f"img{i:04d}"
            meta = {"key": key, "captions": [f"the usual caption {i}"], "width": 80, "height": 60}
            if i != without_alt:
                meta["alt"] = f"the alt text of {i}"
            writer.write(key, make_jpeg(60, 80, i), meta)
    return directory


@pytest.mark.parametrize(
    "backend, reader", [("pil", "external"), ("dali", "external"), ("dali", "webdataset")], ids=["pil", "dali", "wds"]
)
def test_own_shards_take_captions_from_the_named_field(tmp_path, backend, reader):
    directory = write_alt_split(tmp_path / "train")
    cfg = data_cfg(backend, caption_key="alt", dali_reader=reader, num_workers=1)
    batches = list(build_loader(cfg, directory, 4, train=False))
    keys = [key for batch in batches for key in batch["keys"]]
    assert sorted(keys) == [f"img{i:04d}" for i in range(N)]
    for batch in batches:
        assert batch["captions"] == [f"the alt text of {int(key[3:])}" for key in batch["keys"]]


def test_a_sample_without_the_field_is_named(tmp_path):
    directory = write_alt_split(tmp_path / "train", without_alt=5)
    with pytest.raises(ShardFormatError, match=r"img0005\.json: no caption \(data\.caption_key='alt' in its \.json\)"):
        list(build_loader(data_cfg("pil", caption_key="alt", num_workers=0), directory, 4, train=False))


def test_foreign_shards_indexed_for_the_default_refuse_a_json_field_in_one_line(tmp_path):
    """(tests/test_foreign_caption_key.py indexes them for a JSON field.)"""
    write_img2dataset_set(tmp_path)
    assert make_shards(["index", str(tmp_path), "--workers", "1"]) == 0
    with pytest.raises(ConfigError, match=r"data.caption_key='url'.*indexed for caption key 'txt'.*--caption-key url"):
        build_loader(data_cfg("pil", caption_key="url"), str(tmp_path), 4)
    assert len(build_loader(data_cfg("pil"), str(tmp_path), 4)) > 0  # the default still reads
