"""Foreign webdataset shards read as they are (an img2dataset-layout set, tests/
foreign_helpers.py): from a local folder, a brace pattern and http://127.0.0.1, every
sample with an image and a caption reaches a batch exactly once an epoch, with the right
caption (`.txt`, or the JSON's) and pixels (WebP and PNG decoded to RGB by pil, DALI and the
torchvision path alike); what cannot be a sample is skipped and counted by kind, each kind
said once, the cut tar read up to the damage and named once."""

from __future__ import annotations

import io
import json
import math
import logging
import tarfile

import pytest
import torch

from pixelbert_dist.data.decode.dali import dali_available
from pixelbert_dist.data.decode.torch_loader import TorchJpegImages, pil_image
from pixelbert_dist.data.format.members import NoCaption, caption_meta, split_member
from pixelbert_dist.data.loader import build_loader
from tests.data_helpers import MAX, MEAN_TOL, SHORTER, data_cfg
from tests.foreign_helpers import DOTTED, FOREIGN_PATTERN, JSON_ONLY, write_img2dataset_set
from tests.stream_helpers import serve

BATCH, EPOCH = 6, 84  # 14 batches: the 78 good samples, then the stream wraps to 00000.tar


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    directory = tmp_path_factory.mktemp("img2dataset")
    return directory, write_img2dataset_set(directory)


def test_webdataset_key_rule_and_caption_sources():
    assert split_member("000010011.hq.jpg") == ("000010011", "hq.jpg")
    assert split_member("part/a.b/0001.JPG") == ("part/a.b/0001", "jpg")
    assert split_member("README") == ("README", "")
    assert caption_meta(b" a dog \n", b'{"caption": "json one"}')["captions"] == ["a dog"]
    assert caption_meta(None, b'{"caption": "json one", "w": 3}') == {
        "caption": "json one",
        "w": 3,
        "captions": ["json one"],
    }
    assert caption_meta(None, b'{"captions": ["x", "y"]}')["captions"] == ["x", "y"]
    assert caption_meta(b"txt", b'{"alt": "alt text"}', caption_key="alt")["captions"] == ["alt text"]
    with pytest.raises(NoCaption, match="'caption' / 'captions'"):
        caption_meta(None, b'{"url": "u"}')
    with pytest.raises(NoCaption, match="caption_key='alt'"):
        caption_meta(b"txt", b'{"caption": "c"}', caption_key="alt")
    with pytest.raises(NoCaption, match="not valid JSON"):
        caption_meta(None, b"{broken")


def read_epoch(spec, backend="pil"):
    cfg = data_cfg(backend, num_workers=1, epoch_samples=EPOCH, shuffle=False, shuffle_buffer=0)
    loader = build_loader(cfg, spec, BATCH)
    return loader, list(loader)


def member_bytes(directory, key: str) -> bytes:
    with tarfile.open(directory / f"{key[:5]}.tar") as tar:
        for member in tar:
            if member.name.partition(".")[0] == key and member.name.rsplit(".", 1)[1] in ("jpg", "png", "webp"):
                return tar.extractfile(member).read()
    raise KeyError(key)


def check_epoch(loader, batches, expected: dict) -> None:
    keys = [k for b in batches for k in b["keys"]]
    assert keys[:78] == sorted(expected) and len(keys) == EPOCH  # tar order, then the wrap
    captions = dict(zip(keys, [c for b in batches for c in b["captions"]]))
    assert {k: captions[k] for k in expected} == expected
    assert loader.skipped == {"no_image": 1, "no_caption": 1, "truncated_tar": 1}
    assert loader.damaged == 0


def test_folder_pattern_and_http_read_every_sample_once(foreign, caplog):
    directory, expected = foreign
    with serve(directory, probe_file="00000_stats.json") as url:
        for spec in (directory, f"{directory}/{FOREIGN_PATTERN}", f"{url}/{FOREIGN_PATTERN}"):
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="pixelbert_dist.data"):
                loader, batches = read_epoch(str(spec))
            check_epoch(loader, batches, expected)
            lines = [r.getMessage() for r in caplog.records]
            for kind in ("no image", "no caption", "truncated tar"):
                assert sum(line.startswith(f"skipped {kind}:") for line in lines) == 1, (spec, kind, lines)
            assert [line for line in lines if "truncated tar" in line][0].count("00002.tar") == 1
            assert sum("by webdataset's rule its key is '000010011'" in line for line in lines) == 1


def test_webp_and_png_decode_to_the_same_rgb_as_pil(foreign):
    directory, _ = foreign
    loader, batches = read_epoch(str(directory))
    by_key = {k: (b["images"][i], b["image_sizes"][i]) for b in batches for i, k in enumerate(b["keys"])}
    for key in ("000000003", "000000004", JSON_ONLY, DOTTED):  # webp, png (RGBA), jpg, jpg
        image, (h, w) = by_key[key]
        want = pil_image(member_bytes(directory, key), SHORTER, MAX, flip=False)
        assert torch.equal(image[:, :h, :w], want), key


@pytest.mark.skipif(not dali_available(), reason="DALI not installed")
def test_dali_reads_the_same_samples_and_pixels(foreign):
    directory, expected = foreign
    loader, batches = read_epoch(str(directory), backend="dali")
    check_epoch(loader, batches, expected)
    _, reference = read_epoch(str(directory))
    for got, want in zip(batches, reference):
        assert got["keys"] == want["keys"]
        assert torch.equal(got["image_sizes"], want["image_sizes"])
        diff = (got["images"] - want["images"]).abs().flatten(1).mean(1)
        assert float(diff.max()) < MEAN_TOL, got["keys"]


def test_torchvision_path_decodes_png_and_webp_with_pil_and_counts_them(foreign):
    directory, _ = foreign
    keys = ["000000002", "000000003", "000000004"]  # jpg, webp, png
    data = [member_bytes(directory, k) for k in keys]
    decoder = TorchJpegImages(None, 3, SHORTER, MAX, device="cpu")
    images, sizes = decoder.decode(data, [False] * 3)
    assert decoder.not_jpeg == 2
    for i, raw in enumerate(data):
        h, w = sizes[i].tolist()
        want = pil_image(raw, SHORTER, MAX, flip=False)
        assert float((images[i, :, :h, :w] - want).abs().mean()) < MEAN_TOL, keys[i]
    with pytest.raises(RuntimeError, match="non-JPEG"):
        decoder.decode([io.BytesIO(b"GIF89a nonsense").getvalue()], [False])


ROUTES = [("folder", "pil"), ("pattern", "dali"), ("http", "pil"), ("http", "dali")]


@pytest.mark.slow
@pytest.mark.usefixtures("dist_env")
@pytest.mark.parametrize("route,backend", ROUTES, ids=[f"{r}-{b}" for r, b in ROUTES])
def test_pretraining_on_an_img2dataset_set_logs_the_skip_counts(foreign, tmp_path, route, backend):
    """The real Trainer (one gloo rank, ZeRO-2) for 12 steps of 6: with its shuffle buffer
    of 8 the stream reads the whole set once (the cut tar's end too) but not 00000.tar's
    captionless sample again, so metrics.jsonl's last row counts each skip kind once."""
    from pixelbert_dist.config import load_config
    from pixelbert_dist.train.config import RunConfig
    from pixelbert_dist.train.trainer import Trainer
    from tests.pretrain_helpers import fast_overrides, train_losses

    directory, _ = foreign
    with serve(directory, probe_file="00000_stats.json") as url:
        spec = {"folder": directory, "pattern": f"{directory}/{FOREIGN_PATTERN}", "http": f"{url}/{FOREIGN_PATTERN}"}
        overrides = fast_overrides(tmp_path, {"train": spec[route]}, steps=12, val=False)
        overrides += [f"data.backend={backend}", "data.num_workers=1", "data.epoch_samples=72"]
        overrides += ["train.micro_batch=6", "train.export=false", "train.save_every=0", "data.shuffle_buffer=8"]
        run = Trainer(load_config(RunConfig, None, overrides), "deepspeed_configs/zero2.json")
        run.fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["split"] == "train"][-1]
    assert last["step"] == 12
    assert {k: last[k] for k in ("skipped_no_image", "skipped_no_caption", "skipped_truncated_tar")} == {
        "skipped_no_image": 1,
        "skipped_no_caption": 1,
        "skipped_truncated_tar": 1,
    }
    assert all(math.isfinite(loss) for loss in train_losses(tmp_path).values())


@pytest.mark.slow
def test_s3_folder_reads_like_the_local_one(foreign):
    """The set on a real local S3 server (moto, as in test_streaming_s3), listed as a folder."""
    s3fs = pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    from tests.test_streaming_s3 import LocalS3

    directory, expected = foreign
    endpoint = LocalS3()
    with pytest.MonkeyPatch.context() as env:
        for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")):
            env.setenv(name, value)
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_ENDPOINT_URL", endpoint.endpoint)
        s3fs.S3FileSystem.clear_instance_cache()
        endpoint.start()
        try:
            fs = s3fs.S3FileSystem()
            fs.mkdir("foreign")
            fs.put([str(p) for p in sorted(directory.glob("0000*"))], "foreign/set/")  # tars, stats, parquet
            loader, batches = read_epoch("s3://foreign/set/")
            assert len(loader.urls) == 3
            check_epoch(loader, batches, expected)
        finally:
            endpoint.stop()
            s3fs.S3FileSystem.clear_instance_cache()


def test_a_folder_without_epoch_size_points_at_the_index_command(foreign):
    from pixelbert_dist.config import ConfigError

    directory, _ = foreign
    with pytest.raises(ConfigError, match=r"data.epoch_samples.*make_shards.py index"):
        build_loader(data_cfg("pil"), str(directory), BATCH)
