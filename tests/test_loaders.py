"""The image loaders on CPU: real JPEGs in real WebDataset shards, real DALI CPU
pipelines, real PIL DataLoader workers, the shipped BertTokenizer vocab."""

from __future__ import annotations

import io
import json
import logging

import pytest
import torch
from PIL import Image

from pixelbert_dist.data.decode.images import MEAN_255, STD_255, padded_batch_size, resized_size, swap_left_right
from pixelbert_dist.data.loader import build_loader
from pixelbert_dist.data.readers.plan import epoch_plan
from pixelbert_dist.data.format.shards import ShardWriter
from pixelbert_dist.data.format.index import ShardFormatError
from pixelbert_dist.data.decode.torch_loader import TorchJpegImages
from tests.data_helpers import BACKENDS, MAX, MEAN_TOL, SHORTER, data_cfg, mixed_sizes, write_split


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shards") / "train"
    sizes = mixed_sizes(22)
    return directory, write_split(directory, sizes), sizes


def _epoch(directory, backend, batch_size=4, **kw):
    train = kw.pop("train", True)
    loader = build_loader(data_cfg(backend, **kw), directory, batch_size, train=train)
    return loader, list(loader)


def test_resize_rule():
    assert resized_size(480, 640, 800, 1333) == (800, 1067)
    assert resized_size(640, 480, 800, 1333) == (1067, 800)
    assert resized_size(400, 1200, 800, 1333) == (444, 1333)  # max_size wins
    assert resized_size(150, 151, 80, 120) == (80, 81)  # rounds to nearest
    assert padded_batch_size([[800, 1067], [444, 1333]]) == (832, 1344)


def test_dali_and_pil_agree(split):
    directory, keys, sizes = split
    dali_loader, dali = _epoch(directory, "dali", hflip=True)
    _, pil = _epoch(directory, "pil", hflip=True)
    assert len(dali) == len(pil) == len(dali_loader) == 6
    size_of = dict(zip(keys, sizes))
    for a, b in zip(dali, pil):
        assert a["keys"] == b["keys"]
        for name in ("input_ids", "attention_mask", "token_type_ids", "mlm_labels", "itm_labels", "image_sizes"):
            assert torch.equal(a[name], b[name]), name
        assert a["images"].shape == b["images"].shape
        assert a["images"].dtype == torch.float32
        expected = [resized_size(*size_of[k], SHORTER, MAX) for k in a["keys"]]
        assert a["image_sizes"].tolist() == [list(s) for s in expected]
        for i, (h, w) in enumerate(a["image_sizes"].tolist()):
            diff = (a["images"][i, :, :h, :w] - b["images"][i, :, :h, :w]).abs().mean()
            assert diff < MEAN_TOL, (a["keys"][i], float(diff))


def test_padding_to_64_and_zero_outside(split):
    directory, _, _ = split
    _, batches = _epoch(directory, "dali", batch_size=5)
    saw_max_limit = False
    for batch in batches:
        images, sizes = batch["images"], batch["image_sizes"]
        assert images.shape[2] % 64 == 0
        assert images.shape[3] % 64 == 0
        assert tuple(images.shape[2:]) == padded_batch_size(sizes.numpy())
        for i, (h, w) in enumerate(sizes.tolist()):
            assert images[i, :, h:, :].abs().sum() == 0
            assert images[i, :, :, w:].abs().sum() == 0
            assert images[i, :, h - 1, :w].abs().sum() > 0
            assert images[i, :, :h, w - 1].abs().sum() > 0
            saw_max_limit |= max(h, w) == MAX and min(h, w) < SHORTER
    assert saw_max_limit, "the set should include images whose longer side hits max_size"


def test_normalisation_matches_imagenet_stats(tmp_path):
    """A flat grey JPEG must come out as (128 - mean) / std per channel."""
    directory = tmp_path / "grey"
    with ShardWriter(directory, "train") as writer:
        buf = io.BytesIO()
        Image.new("RGB", (120, 96), (128, 128, 128)).save(buf, "JPEG", quality=95)
        writer.write(
            "grey", buf.getvalue(), {"key": "grey", "captions": ["grey"], "image_id": "g", "width": 120, "height": 96}
        )
    for backend in BACKENDS:
        _, (batch,) = _epoch(directory, backend, batch_size=1, train=False)
        got = batch["images"][0, :, :96, :120].mean(dim=(1, 2))
        want = (128 - torch.tensor(MEAN_255)) / torch.tensor(STD_255)
        assert torch.allclose(got, want, atol=0.02), (backend, got, want)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_are_disjoint_and_cover_the_epoch(split, backend):
    directory, keys, _ = split
    world, per_epoch = 3, {}
    for epoch in (0, 1):
        seen, counts = [], []
        for rank in range(world):
            loader = build_loader(data_cfg(backend), directory, 4, rank=rank, world_size=world)
            loader.set_epoch(epoch)
            batches = list(loader)
            counts.append([len(b["keys"]) for b in batches])
            seen += [(k, bool(p)) for b in batches for k, p in zip(b["keys"], b["is_pad"])]
        real = [k for k, pad in seen if not pad]
        assert sorted(real) == sorted(keys)  # each sample exactly once
        assert sum(pad for _, pad in seen) == -(-len(keys) // world) * world - len(keys)
        assert all(c == counts[0] for c in counts)  # same batches on every rank
        per_epoch[epoch] = [k for k, _ in seen]
    assert per_epoch[0] != per_epoch[1]  # a new epoch reshuffles


def test_eval_keeps_order_and_every_sample(split):
    directory, keys, _ = split
    seen = []
    for rank in range(4):
        loader = build_loader(data_cfg("dali", hflip=True), directory, 4, rank=rank, world_size=4, train=False)
        for batch in loader:
            assert (batch["mlm_labels"] == -100).all()
            assert (batch["itm_labels"] == 1).all()
            seen += [k for k, p in zip(batch["keys"], batch["is_pad"]) if not p]
    assert sorted(seen) == keys


def test_hflip_mirrors_pixels_and_swaps_words(split):
    directory, _, _ = split
    _, plain = _epoch(directory, "dali", hflip=False)
    _, flipped = _epoch(directory, "dali", hflip=True)
    n_flipped = 0
    for a, b in zip(plain, flipped):
        assert a["keys"] == b["keys"]
        for i, (h, w) in enumerate(a["image_sizes"].tolist()):
            same = torch.equal(a["images"][i, :, :h, :w], b["images"][i, :, :h, :w])
            mirrored = torch.allclose(a["images"][i, :, :h, :w].flip(-1), b["images"][i, :, :h, :w], atol=1e-5)
            assert same != mirrored, a["keys"][i]
            expected = swap_left_right(a["captions"][i]) if mirrored else a["captions"][i]
            assert b["captions"][i] == expected
            n_flipped += mirrored
    assert 0 < n_flipped < 22
    assert swap_left_right("Left of the LEFT box, right-hand, bright") == "Right of the RIGHT box, left-hand, bright"


def test_bucketing_cuts_padding(tmp_path):
    directory = tmp_path / "aspect"
    sizes = [(64, 160) if i % 2 else (160, 64) for i in range(32)]
    keys = write_split(directory, sizes, per_shard=16)
    fractions = {}
    for bucketing in (False, True):
        loader, batches = _epoch(directory, "dali", bucketing=bucketing, bucket_window=8)
        assert sorted(k for b in batches for k in b["keys"]) == keys
        fractions[bucketing] = loader.padding_fraction
    assert fractions[True] < 0.5 * fractions[False], fractions


def test_epoch_plan_rules():
    for n, world, batch in [(10, 3, 4), (7, 4, 2), (12, 2, 3), (1, 2, 4)]:
        plans = [epoch_plan(n, epoch=0, seed=1, rank=r, world_size=world, batch_size=batch) for r in range(world)]
        real = sorted(p.index for plan in plans for b in plan for p in b if not p.is_pad)
        assert real == list(range(n))
        assert len({tuple(len(b) for b in plan) for plan in plans}) == 1
        dropped = (
            [
                epoch_plan(n, epoch=0, seed=1, rank=r, world_size=world, batch_size=batch, drop_last=True)
                for r in range(world)
            ]
            if n >= world * batch
            else []
        )
        for plan in dropped:
            assert all(len(b) == batch for b in plan)
            assert not any(p.is_pad for b in plan for p in b)


def test_torchvision_decode_path_matches_pil(split):
    """The nvjpeg backend's resize/flip/pad code, run with torchvision's CPU decoder."""
    directory, _, _ = split
    loader, pil = _epoch(directory, "pil", hflip=True)
    work = [[(p.index, loader._flip(loader.index.samples[p.index].key)) for p in b] for b in loader.plan()]
    for (images, sizes), ref in zip(TorchJpegImages(loader.index, 4, SHORTER, MAX, "cpu").batches(work), pil):
        assert torch.equal(sizes, ref["image_sizes"])
        valid = torch.zeros_like(images, dtype=torch.bool)
        for i, (h, w) in enumerate(sizes.tolist()):
            valid[i, :, :h, :w] = True
        assert (images - ref["images"]).abs()[valid].mean() < MEAN_TOL


def test_nvjpeg_refuses_without_cuda(split):
    directory, _, _ = split
    with pytest.raises(RuntimeError, match=r"nvjpeg.*CUDA.*'dali'.*'pil'"):
        build_loader(data_cfg("nvjpeg"), directory, 4, device="cpu")


def test_bad_inputs_are_named(tmp_path, split, caplog):
    with pytest.raises(ShardFormatError, match="manifest.json not found"):
        build_loader(data_cfg("pil"), tmp_path, 4)
    with pytest.raises(ValueError, match="data.backend='jpegxl'"):
        build_loader(data_cfg("jpegxl"), split[0], 4)
    broken = tmp_path / "broken"
    write_split(broken, [(80, 90)] * 3)
    tar = next(broken.glob("*.tar"))
    tar.write_bytes(tar.read_bytes()[:1500])
    loader = build_loader(data_cfg("pil", num_workers=0), broken, 4)  # no per-shard stat at start-up
    with caplog.at_level(logging.WARNING, logger="pixelbert_dist.data"):
        with pytest.raises(ShardFormatError, match=f"{tar.name}.*truncated shard"):  # every sample cut
            list(loader)
    assert any(tar.name in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)
    tar.unlink()
    with pytest.raises(ShardFormatError, match=f"{tar.name} listed in .*manifest.json is missing"):
        list(build_loader(data_cfg("pil", num_workers=0), broken, 4))
    manifest = json.loads((broken / "manifest.json").read_text())
    assert manifest["num_samples"] == 3
