"""DALI pads a batch by normalising into a window sized from the image headers
(``decode/pad_window.py``) instead of a ``fn.pad`` pass: the batches must equal, pixel
for pixel, those of the old graph (``crop_mirror_normalize`` then ``fn.pad``), flips,
odd sizes, a sideways-stored EXIF JPEG, a PNG and a header-less batch included."""

from __future__ import annotations

import gc
import io
from collections import deque

import numpy as np
import pytest
import torch
from PIL import Image

from pixelbert_dist.data.decode.dali import DaliImages, dali_available
from pixelbert_dist.data.decode.images import MEAN_255, PAD_MULTIPLE, STD_255, padded_batch_size, resized_size
from pixelbert_dist.data.decode.pad_window import pad_window
from tests.data_helpers import MAX, SHORTER, make_jpeg, mixed_sizes

needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")


def _exif_jpeg(height: int, width: int, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.open(io.BytesIO(make_jpeg(height, width, 7))).save(buf, "JPEG", quality=92, exif=exif.tobytes())
    return buf.getvalue()


def _png(height: int, width: int) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(make_jpeg(height, width, 3))).save(buf, "PNG")
    return buf.getvalue()


def test_window_of_plain_jpegs_is_the_padded_batch_size():
    sizes = mixed_sizes(6, seed=4)
    jpegs = [make_jpeg(h, w, i) for i, (h, w) in enumerate(sizes)]
    expected = padded_batch_size([resized_size(h, w, SHORTER, MAX) for h, w in sizes])
    assert pad_window(jpegs, SHORTER, MAX) == expected


def test_window_takes_a_transposing_exif_image_both_ways_round():
    # 150 x 90 stored, orientation 6 (rotate 90): 160 x 96 as stored, 96 x 160 upright
    assert pad_window([_exif_jpeg(150, 90, 6)], SHORTER, MAX) == (192, 192)
    assert pad_window([_exif_jpeg(150, 90, 3)], SHORTER, MAX) == (192, 128)  # 180 degrees: as stored
    assert pad_window([_png(90, 150)], SHORTER, MAX) == (128, 192)


def test_window_without_a_header_is_the_bound_of_the_resize_rule():
    assert pad_window([make_jpeg(90, 150, 1), b"not an image"], SHORTER, MAX) == (192, 192)


def _old_graph(batches: list[tuple[list[bytes], list[bool]]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The graph before the window: crop_mirror_normalize, then fn.pad to x64."""
    from nvidia.dali import fn, pipeline_def, types

    feed = iter(batches)

    def source():
        jpegs, flips = next(feed)
        return [np.frombuffer(j, dtype=np.uint8) for j in jpegs], [np.int32(f) for f in flips]

    @pipeline_def(batch_size=len(batches[0][0]), num_threads=1, device_id=None, exec_dynamic=True)
    def pipe():
        jpegs, mirror = fn.external_source(source=source, num_outputs=2, batch=True, dtype=[types.UINT8, types.INT32])
        images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        images = fn.resize(
            images, resize_shorter=SHORTER, max_size=MAX, antialias=True, interp_type=types.INTERP_LINEAR
        )
        sizes = images.shape()
        images = fn.crop_mirror_normalize(
            images, mirror=mirror, mean=list(MEAN_255), std=list(STD_255), output_layout="CHW", dtype=types.FLOAT
        )
        return fn.pad(images, axes=(1, 2), align=PAD_MULTIPLE, fill_value=0.0), sizes

    built = pipe()
    built.build()
    out = []
    for _ in batches:
        images, sizes = built.run()
        hw = torch.tensor(np.stack([np.asarray(s)[:2] for s in sizes]), dtype=torch.int64)
        out.append((torch.from_numpy(np.array(images.as_tensor())), hw))
    return out


@needs_dali
def test_windowed_batches_equal_the_old_graph_pixel_for_pixel():
    sizes = mixed_sizes(12, seed=9)
    plain = [make_jpeg(h, w, i) for i, (h, w) in enumerate(sizes)]
    batches = [
        (plain[0:4], [False, True, True, False]),
        (plain[4:8], [True, True, False, False]),
        (plain[8:12], [False, False, False, True]),
        # sideways EXIF, upright once decoded, and a PNG: all landscape, so the window
        # (both ways round, 192 x 192) is trimmed to the batch's 128 x 192
        ([_exif_jpeg(150, 90, 6), plain[1], _png(90, 150), _exif_jpeg(120, 70, 8)], [True, False, True, False]),
    ]
    assert pad_window(batches[3][0], SHORTER, MAX) == (192, 192)
    dali = DaliImages(None, 4, SHORTER, MAX, num_threads=2)
    got = list(dali.decode(iter((k, jpegs, flips) for k, (jpegs, flips) in enumerate(batches)), deque(), []))
    assert [k for k, _, _ in got] == [0, 1, 2, 3]
    assert got[3][1].shape[2:] == (128, 192)
    for (_, images, hw), (old_images, old_hw) in zip(got, _old_graph(batches)):
        assert torch.equal(hw, old_hw)
        assert images.shape == old_images.shape and images.is_contiguous()
        assert torch.equal(images, old_images)


@needs_dali
def test_batches_outlive_the_pipeline_that_made_them():
    """The batches are DALI's own buffers (no copy): later runs and the pipeline's end
    must leave them as they were."""
    sizes = mixed_sizes(16, seed=2)
    jpegs = [make_jpeg(h, w, i) for i, (h, w) in enumerate(sizes)]
    batches = [(jpegs[k : k + 4], [k % 8 == 0] * 4) for k in range(0, 16, 4)]
    feed = iter((k, j, f) for k, (j, f) in enumerate(batches))
    kept = [images for _, images, _ in DaliImages(None, 4, SHORTER, MAX).decode(feed, deque(), [])]
    gc.collect()  # the pipeline is gone
    for images, (old_images, _) in zip(kept, _old_graph(batches)):
        assert torch.equal(images, old_images)


def test_a_batch_larger_than_its_window_is_refused_not_cut():
    from pixelbert_dist.data.decode.dali import _padded

    images = torch.arange(2 * 3 * 192 * 192, dtype=torch.float32).reshape(2, 3, 192, 192)
    assert _padded(images, torch.tensor([[96, 160], [100, 120]]), (192, 192)).shape == (2, 3, 128, 192)
    assert _padded(images, torch.tensor([[96, 160]] * 2), (128, 192)) is images
    with pytest.raises(RuntimeError, match=r"larger than their headers said \(padded window \(128, 192\)\)"):
        _padded(images, torch.tensor([[160, 96], [96, 160]]), (128, 192))
