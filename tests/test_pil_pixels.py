"""The PIL backend's batches, made in place by its workers (float for the CPU, uint8
normalised on the device for a GPU: ``images.pad_pixels`` / ``normalize_padded``), must
keep the training numbers. Real JPEGs through real DataLoader workers, indexed and
streamed, against the float path the backend had before, written out here: each image
normalised from its HWC view in the worker, then padded with zeros."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pixelbert_dist.data.decode.images import normalize_hwc_uint8, normalize_padded, pad_batch, pad_pixels
from pixelbert_dist.data.decode.images import resized_size
from pixelbert_dist.data.decode.stream_pixels import PilPixels, StreamImages
from pixelbert_dist.data.decode.torch_loader import PilDecode
from pixelbert_dist.data.loader import FlipRule, build_loader
from tests.data_helpers import MAX, SHORTER, data_cfg, make_jpeg, mixed_sizes, write_split
from tests.stream_helpers import N, PATTERN, pil_stream, write_stream_shards

TOLERANCE = 1e-6  # float32 rounding; the ops are the same, so in practice 0


def old_float_batch(jpegs: list[bytes], flips: list[bool]) -> torch.Tensor:
    """The batch as the workers made it before: decode, resize, flip, normalise, pad."""
    images = []
    for data, flip in zip(jpegs, flips):
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB")
        height, width = resized_size(img.height, img.width, SHORTER, MAX)
        img = img.resize((width, height), Image.Resampling.BILINEAR)
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        images.append(normalize_hwc_uint8(torch.from_numpy(np.asarray(img).copy())))
    return pad_batch(images)[0]


def assert_same_numbers(batches, jpeg_of, flip_of) -> None:
    flipped = 0
    for batch in batches:
        flips = [flip_of(key) for key in batch["keys"]]
        want = old_float_batch([jpeg_of(key) for key in batch["keys"]], flips)
        assert batch["images"].dtype == torch.float32
        assert batch["images"].shape == want.shape
        assert (batch["images"] - want).abs().max() <= TOLERANCE, batch["keys"]
        flipped += sum(flips)
    assert flipped > 0, "some images should have been flipped"


@pytest.mark.parametrize("uint8_batches", [False, True], ids=["cpu-floats", "gpu-uint8"])
def test_indexed_pil_batches_equal_the_float_path(tmp_path, uint8_batches):
    sizes = mixed_sizes(16, seed=3)
    keys = write_split(tmp_path / "train", sizes, per_shard=5)
    jpegs = {key: make_jpeg(*size, i) for i, (key, size) in enumerate(zip(keys, sizes))}
    cfg = data_cfg("pil", hflip=True, num_workers=2)
    loader = build_loader(cfg, tmp_path / "train", 4)
    loader.images.uint8_batches = uint8_batches  # what a CUDA device picks, normalised here on the CPU
    batches = list(loader)
    assert len(batches) == 4
    assert_same_numbers(batches, jpegs.__getitem__, FlipRule(cfg.seed, 0, True))


@pytest.mark.parametrize("uint8_batches", [False, True], ids=["cpu-floats", "gpu-uint8"])
def test_streamed_pil_batches_equal_the_float_path(tmp_path, uint8_batches):
    directory = write_stream_shards(tmp_path / "stream")
    sizes = mixed_sizes(N, seed=4)
    loader = pil_stream(str(directory / PATTERN), num_workers=2)
    if uint8_batches:  # what stream_images picks for a CUDA device, normalised here on the CPU
        loader.images = StreamImages("pil", PilDecode(SHORTER, MAX, normalize=False), PilPixels("cpu"))
    batches = list(loader)
    assert len(batches) == len(loader) == 4
    assert_same_numbers(batches, lambda key: make_jpeg(*sizes[int(key[3:])], int(key[3:])), loader.text.flip_rule(0))


def test_normalize_padded_zeroes_only_the_padding():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(70, 90), (64, 130), (5, 3)]]
    pixels, sizes = pad_pixels(images, normalize=False)
    assert pixels.dtype == torch.uint8 and tuple(pixels.shape) == (3, 3, 128, 192)
    floats, float_sizes = pad_pixels(images, normalize=True)
    want, want_sizes = pad_batch([normalize_hwc_uint8(torch.from_numpy(img.copy())) for img in images])
    assert torch.equal(sizes, want_sizes) and torch.equal(float_sizes, want_sizes)
    assert torch.equal(normalize_padded(pixels, sizes), want)
    assert torch.equal(floats, want)
