"""`make_shards.py index DIR --caption-key FIELD`: foreign webdataset shards (the
img2dataset-layout set of tests/foreign_helpers.py, each JSON given a ``caption_en`` field
that its ``.txt`` does not hold) indexed for a JSON field: the rows point at each sample's
``.json`` and the manifest records the key; the indexed loader reads that field on pil and
DALI; a sample without it is skipped and counted; a loader (or a rerun) with another key
is refused in one line that names the command, and that command works; a crashed run
resumed with another key indexes every shard again."""

from __future__ import annotations

import json
import logging
import shlex
import tarfile

import numpy as np
import pytest

from pixelbert_dist.config import ConfigError
from pixelbert_dist.data.builders.cli import main as make_shards
from pixelbert_dist.data.decode.dali import dali_available
from pixelbert_dist.data.format import index as fmt_index
from pixelbert_dist.data.format.foreign_index import PROGRESS, index_foreign
from pixelbert_dist.data.format.index import ShardFormatError
from pixelbert_dist.data.format.shards import ShardWriter, read_manifest, read_skipped
from pixelbert_dist.data.loader import build_loader
from tests.data_helpers import data_cfg, make_jpeg
from tests.foreign_helpers import CUT_AT, FOREIGN_PATTERN, NO_CAPTION, NO_IMAGE, PER_SHARD, SHARDS
from tests.foreign_helpers import write_img2dataset_set

KEY = "caption_en"
WITHOUT_KEY = "000010005"  # has a .txt and a JSON caption, but no caption_en


def english(key: str) -> dict:
    return {} if key == WITHOUT_KEY else {KEY: f"an english caption for {key}"}


def expected_captions() -> dict[str, str]:
    """{key: caption_en} of every sample the key-indexed set holds: NO_CAPTION (no .txt,
    no JSON caption) has caption_en, so it is one of them; WITHOUT_KEY is not."""
    out = {}
    for shard in range(SHARDS):
        for i in range(CUT_AT if shard == SHARDS - 1 else PER_SHARD):
            key = f"{shard:05d}{i:04d}"
            if key not in (NO_IMAGE, WITHOUT_KEY):
                out[key] = english(key)[KEY]
    return out


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    directory = tmp_path_factory.mktemp("keyed")
    write_img2dataset_set(directory, english)
    assert make_shards(["index", str(directory), "--caption-key", KEY, "--workers", "2"]) == 0
    return directory


def test_rows_point_at_the_json_and_the_manifest_records_the_key(keyed):
    manifest = read_manifest(keyed, verify=True)
    assert manifest.caption_key == KEY and json.loads((keyed / "manifest.json").read_text())["caption_key"] == KEY
    assert [s.num_samples for s in manifest.shards] == [30, 28, 20]
    assert manifest.num_samples == len(expected_captions())
    with tarfile.open(keyed / "00001.tar") as tar:
        jsons = {m.offset_data: m.size for m in tar if m.name.endswith(".json")}
    rows = fmt_index.load(keyed / "00001.idx.npy")
    for block, size in zip(rows[fmt_index.JSON_BLOCK].tolist(), rows[fmt_index.JSON_SIZE].tolist()):
        assert jsons[block * fmt_index.BLOCK] == size  # the .json member, never the .txt


def test_a_sample_without_the_key_is_skipped_and_counted(keyed):
    skipped = read_skipped(keyed)
    reasons = {e["file"]: e["reason"] for e in skipped}
    assert reasons[f"00001.tar:{WITHOUT_KEY}"] == f"no_caption: no {KEY!r} in its .json"
    assert sorted(r.split(":")[0] for r in reasons.values()) == ["no_caption", "no_image", "truncated_tar"]
    assert read_manifest(keyed).skipped == 3


@pytest.mark.parametrize("backend", ["pil", "dali"])
def test_the_indexed_loader_reads_the_json_field(keyed, backend):
    if backend == "dali" and not dali_available():
        pytest.skip("DALI not installed")
    loader = build_loader(data_cfg(backend, caption_key=KEY, seed=5), str(keyed), 6)
    assert loader.backend == {"pil": "pil", "dali": "dali-cpu"}[backend]
    captions = {}
    for batch in loader:
        for key, caption, pad in zip(batch["keys"], batch["captions"], batch["is_pad"].tolist()):
            if not pad:
                assert key not in captions  # each sample once an epoch
                captions[key] = caption
    assert captions == expected_captions() and loader.damaged == 0
    assert captions[NO_CAPTION] == english(NO_CAPTION)[KEY]  # its caption lives only in the field


def test_another_key_is_refused_in_one_line_naming_the_command_that_works(keyed, tmp_path):
    with pytest.raises(ConfigError) as refused:
        build_loader(data_cfg("pil"), str(keyed), 6)
    message = str(refused.value)
    command = f"python launch/make_shards.py index {keyed} --force"
    assert message == (
        f"data.caption_key='txt': {keyed} was indexed for caption key {KEY!r} (its manifest.json: the rows "
        f"are the samples with that caption); index it again for 'txt': `{command}`, "
        f"or set data.caption_key={KEY!r}"
    )
    default = tmp_path / "default"
    write_img2dataset_set(default, english)
    assert make_shards(["index", str(default), "--workers", "1"]) == 0
    with pytest.raises(ConfigError) as refused:
        build_loader(data_cfg("pil", caption_key=KEY), str(default), 6)
    command = str(refused.value).split("`")[1]
    assert command == f"python launch/make_shards.py index {default} --caption-key {KEY} --force"
    assert make_shards(shlex.split(command)[2:]) == 0  # the command as said, run
    loader = build_loader(data_cfg("pil", caption_key=KEY, shuffle=False), str(default), 6)
    keys = [k for batch in loader for k, pad in zip(batch["keys"], batch["is_pad"].tolist()) if not pad]
    assert sorted(keys) == sorted(expected_captions())


def test_a_rerun_with_another_key_refuses_without_force(keyed, capsys):
    assert make_shards(["index", str(keyed), "--caption-key", "url"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: {keyed} was indexed for caption key {KEY!r} (its manifest.json); index it again for 'url': "
        f"`python launch/make_shards.py index {keyed} --caption-key url --force`"
    )
    assert make_shards(["index", str(keyed)]) == 0  # no key asked: indexed already, nothing to do
    assert make_shards(["index", str(keyed), "--caption-key", KEY]) == 0
    assert read_manifest(keyed).caption_key == KEY


def test_a_crashed_run_resumed_with_another_key_indexes_every_shard_again(tmp_path, caplog):
    directory = tmp_path / "set"
    write_img2dataset_set(directory, english)

    def crash_after_first(record):
        raise KeyboardInterrupt(record["file"])

    with pytest.raises(KeyboardInterrupt):
        index_foreign(directory, workers=1, progress=crash_after_first)  # the default key
    assert len((directory / PROGRESS).read_text().splitlines()) == 1
    again = []
    with caplog.at_level(logging.WARNING, logger="pixelbert_dist.data"):
        manifest = index_foreign(directory, 1, lambda r: again.append(r["file"]), caption_key=KEY)
    assert again == ["00000.tar", "00001.tar", "00002.tar"]  # 00000.tar too: it was indexed for 'txt'
    assert "1 shard(s) in index-progress.jsonl were indexed for caption key 'txt', not 'caption_en'" in caplog.text
    assert manifest.caption_key == KEY and manifest.num_samples == len(expected_captions())
    fresh = tmp_path / "fresh"
    write_img2dataset_set(fresh, english)
    index_foreign(fresh, workers=1, caption_key=KEY)
    for name in ("00000.idx.npy", "00001.idx.npy", "00002.idx.npy"):
        assert np.array_equal(fmt_index.load(directory / name), fmt_index.load(fresh / name))


def test_the_key_is_for_foreign_tars_only(tmp_path, capsys):
    with ShardWriter(tmp_path, "train", samples_per_shard=2) as writer:
        for i in range(3):
            writer.write(f"img{i}", make_jpeg(40, 50, i), {"captions": [f"c {i}"], "width": 50, "height": 40})
    assert make_shards(["index", str(tmp_path), "--caption-key", KEY]) == 2
    assert "--caption-key is for foreign webdataset tars" in capsys.readouterr().err
    assert "caption_key" not in json.loads((tmp_path / "manifest.json").read_text())  # own manifests unchanged


@pytest.mark.parametrize("caption_key", [KEY, "txt"])
def test_streamed_with_key_indexed_sidecars(keyed, caption_key):
    """The sidecars list the samples with caption_en: streamed with that key, every one is
    read once and CRC-checked; streamed with the default rule, the sample the index left
    out for want of caption_en (it has a .txt) is a sidecar that does not fit: named."""
    cfg = data_cfg("pil", num_workers=0, epoch_samples=84, shuffle=False, shuffle_buffer=0, caption_key=caption_key)
    loader = build_loader(cfg, f"{keyed}/{FOREIGN_PATTERN}", 6)
    if caption_key == "txt":
        named = rf"no sample starts at byte \d+ \({WITHOUT_KEY}\.jpg\).*--caption-key"
        with pytest.raises(ShardFormatError, match=named):
            list(loader)
        return
    captions = {k: c for batch in loader for k, c in zip(batch["keys"], batch["captions"])}
    assert captions == expected_captions() and loader.unchecked is None and loader.damaged == 0
    assert loader.skipped == {"no_image": 1, "no_caption": 1, "truncated_tar": 1}


def test_default_sidecars_stream_with_a_json_field(tmp_path):
    """Sidecars made for the default rule list the samples with a .txt or JSON caption:
    streamed with caption_en, those without the field are skipped (WITHOUT_KEY), and so
    is NO_CAPTION, which the index left out (its caption_en is never met)."""
    write_img2dataset_set(tmp_path, english)
    assert make_shards(["index", str(tmp_path), "--workers", "1"]) == 0
    cfg = data_cfg("pil", num_workers=0, epoch_samples=84, shuffle=False, shuffle_buffer=0, caption_key=KEY)
    loader = build_loader(cfg, f"{tmp_path}/{FOREIGN_PATTERN}", 6)
    captions = {k: c for batch in loader for k, c in zip(batch["keys"], batch["captions"])}
    wanted = {k: c for k, c in expected_captions().items() if k != NO_CAPTION}
    assert captions == wanted and loader.unchecked is None and loader.damaged == 0
    assert loader.skipped == {"no_image": 1, "no_caption": 2, "truncated_tar": 1}
