"""Shared by the loader tests: real JPEGs, small shard splits, the loader config they are
read with, and a pure-Python reference of the epoch order.

Import as ``from tests.data_helpers import ...`` (tests run from the repo root).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pixelbert_dist.data.config import DataConfig
from pixelbert_dist.data.readers.plan import FEISTEL_ROUNDS, MIN_BITS
from pixelbert_dist.data.format.shards import ShardWriter

BACKENDS = ["dali", "pil"]
SHORTER, MAX = 96, 160  # small stand-ins for 800 / 1333 (ratio 1.67 as in the paper)
# DALI and PIL decode and filter with different rounding: on these images the mean
# |diff| per image is at most ~0.008 in normalised units (~0.45 grey levels). 0.015 keeps
# 2x headroom yet fails a nearest-neighbour resize (~0.022 here), and any misalignment,
# flip or channel swap (> 0.3).
MEAN_TOL = 0.015
M64 = (1 << 64) - 1


def make_jpeg(height: int, width: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + 2 * y) % 256], -1)
    pixels = np.clip(pixels + rng.normal(0, 4, pixels.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=92)
    return buf.getvalue()


def write_split(directory, sizes, per_shard: int = 7) -> list[str]:
    """Shards of samples with the given (h, w); two captions each, with left/right words."""
    keys = []
    with ShardWriter(directory, "train", samples_per_shard=per_shard) as writer:
        for i, (height, width) in enumerate(sizes):
            key = f"img{i:04d}"
            captions = [f"the dog on the left of box {i}", f"Right of the {i} is a Left cat"]
            writer.write(
                key,
                make_jpeg(height, width, i),
                {
                    "key": key,
                    "captions": captions,
                    "source": "test",
                    "image_id": f"id{i}",
                    "width": width,
                    "height": height,
                },
            )
            keys.append(key)
    return keys


def write_tiny_shards(directory, shards: int, per_shard: int):
    """``shards`` shards of ``per_shard`` 8x6 samples (``img0000``..., one caption each)
    in ``directory``, with their index sidecars; returns it."""
    with ShardWriter(directory, "train", samples_per_shard=per_shard) as writer:
        for i in range(shards * per_shard):
            writer.write(f"img{i:04d}", make_jpeg(8, 6, i), {"key": f"img{i:04d}", "captions": [f"caption {i}"]})
    return directory


def mixed_sizes(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """Odd sizes, landscape and portrait, some past the max_size limit."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        long_side, short_side = int(rng.integers(100, 201)), int(rng.integers(61, 100))
        out.append((short_side, long_side) if i % 2 else (long_side, short_side))
    return out


def data_cfg(backend: str, **kw) -> DataConfig:
    kw.setdefault("num_workers", 2 if backend == "pil" else 1)
    return DataConfig(backend=backend, image_shorter=SHORTER, image_max=MAX, **kw)


def _splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def reference_shuffle(n: int, seed: int, epoch: int) -> list[int]:
    """The whole epoch order, one Python int at a time (EpochShuffle's docstring)."""
    bits = max(MIN_BITS, (n - 1).bit_length())
    keys = [int(k) for k in np.random.SeedSequence([seed, epoch]).generate_state(FEISTEL_ROUNDS, np.uint64)]

    def feistel(x: int) -> int:
        left_bits, right_bits = bits // 2, bits - bits // 2
        left, right = x >> right_bits, x % (1 << right_bits)
        for key in keys:
            left, right = right, left ^ (_splitmix64(right ^ key) % (1 << left_bits))
            left_bits, right_bits = right_bits, left_bits
        return left << right_bits | right

    out = []
    for p in range(n):
        x = feistel(p)
        while x >= n:
            x = feistel(x)
        out.append(x)
    return out
