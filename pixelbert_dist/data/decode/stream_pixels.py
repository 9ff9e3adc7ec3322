"""Pixels for streamed batches, per backend (``readers/stream.py`` reads the samples).

* ``pil``: the stream workers decode, resize and pad (``PilDecode``): float batches for
  the CPU; for a GPU uint8 batches, normalised there by the rank's process (``PilPixels``).
* ``dali`` / ``nvjpeg``: the workers only check each JPEG (``JpegCheck``) and hand over
  its bytes; the rank's process decodes each batch with ``DaliImages.decode`` (the
  pipeline of the indexed path, fed through its external source: DALI's CPU decoder,
  or nvJPEG with ``device="mixed"`` on a GPU) or ``TorchJpegImages.decode``
  (``torchvision.io.decode_jpeg`` on the GPU).

Why a check in the workers: whether a sample is damaged decides which samples make each
batch (a damaged one is skipped and the next in the stream takes its place), so it must
be known where the stream is read, and be the same test as the pil backend's decode, or
the backends (and a resumed run) would see different batches. DALI's decoder cannot be
that test: it turns some damaged JPEGs into garbage without an error. ``JpegCheck`` runs
the JPEG's whole entropy-coded data through libjpeg as PIL's decode does, at 1/8 scale
(``Image.draft``: no full-size inverse DCT, colour conversion or resize), so it fails
where PIL's decode fails (300 cut, bit-flipped and 64-byte-xored test JPEGs: 113
failed both ways, 0 disagreed) at about half the cost of the decode alone.

A batch that passes the check but that DALI or nvJPEG cannot decode (a format PIL reads
and they do not) is decoded with PIL here instead: same samples, images within decoder
rounding, one warning naming its keys.
"""

from __future__ import annotations

import io
import itertools
import logging
from collections import deque
from typing import Callable, Iterator, NamedTuple

import torch
from PIL import Image

from pixelbert_dist.data.decode.dali import DaliImages
from pixelbert_dist.data.decode.images import normalize_padded
from pixelbert_dist.data.decode.read_ahead import prefetched
from pixelbert_dist.data.decode.torch_loader import PilDecode, nvjpeg_images

log = logging.getLogger("pixelbert_dist.data")


class JpegCheck:
    """``check(jpeg, flip, where)``: the bytes of a JPEG that PIL would decode; raises
    ValueError as ``PilDecode`` does otherwise (picklable, for workers)."""

    makes_pixels = False  # streaming: the workers hand over JPEG bytes

    def __call__(self, jpeg: bytes, flip: bool, where: str = "") -> bytes:
        try:
            with Image.open(io.BytesIO(jpeg)) as img:
                img.draft("RGB", (1, 1))  # libjpeg's smallest DCT scale; no-op for non-JPEG
                img.load()
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot decode JPEG {where}: {err}") from None
        return jpeg


class StreamImages(NamedTuple):
    name: str
    prepare: Callable  # in the stream workers, per sample: PilDecode or JpegCheck
    pixels: Callable | None  # in the rank's process: batches of bytes -> batches with images


def stream_images(cfg, batch_size: int, device) -> StreamImages:
    pil = PilDecode(cfg.image_shorter, cfg.image_max)
    if cfg.backend == "pil":
        on_gpu = torch.device(device).type == "cuda"  # as PilImages.uint8_batches
        decode = PilDecode(cfg.image_shorter, cfg.image_max, normalize=not on_gpu)
        return StreamImages("pil", decode, PilPixels(device) if on_gpu else None)
    if cfg.backend == "dali":
        dali = DaliImages(
            None,
            batch_size,
            cfg.image_shorter,
            cfg.image_max,
            num_threads=cfg.num_workers,
            prefetch=cfg.prefetch,
            device=device,
        )
        return StreamImages(dali.name, JpegCheck(), DaliPixels(dali, pil))
    decoder = nvjpeg_images(None, batch_size, cfg.image_shorter, cfg.image_max, device=device)
    return StreamImages(decoder.name, JpegCheck(), TorchJpegPixels(decoder, pil))


def _feed(batches: Iterator, errors: list) -> Iterator[tuple]:
    """DALI's items; an error of the stream ends them, kept for the caller to raise once
    the batches fed before it are out."""
    try:
        for got in batches:
            yield got, got.jpegs, got.flips
    except Exception as err:  # noqa: BLE001 - re-raised by DaliPixels
        errors.append(err)


class DaliPixels:
    """Streamed batches through ``DaliImages.decode``. A batch DALI cannot decode (the
    first fed and not yielded: DALI reports in order) goes to PIL, and a new pipeline
    takes the batches fed after it, then the rest of the stream."""

    def __init__(self, dali: DaliImages, fallback: PilDecode):
        self.dali, self.fallback = dali, fallback

    def __call__(self, batches: Iterator) -> Iterator:
        errors: list[Exception] = []
        # pulled from the stream on a reader thread; one wrapper for every pipeline,
        # so the batches it read ahead go to the next one after a failure
        ahead = prefetched(_feed(batches, errors), self.dali.prefetch)
        try:
            yield from self._decoded(ahead, errors)
        finally:
            ahead.close()

    def _decoded(self, feed: Iterator, errors: list) -> Iterator:
        while True:
            in_flight: deque = deque()
            failures: list[str] = []
            for got, images, sizes in self.dali.decode(feed, in_flight, failures):
                yield got._replace(images=images, sizes=sizes)
            if errors:
                raise errors[0]
            if not failures:
                return
            yield with_pil(in_flight.popleft()[0], self.fallback, f"DALI: {failures[0]}")
            feed = itertools.chain(in_flight, feed)


class PilPixels:
    """Streamed uint8 batches from the PIL workers, normalised on ``device``."""

    def __init__(self, device):
        self.device = torch.device(device)

    def __call__(self, batches: Iterator) -> Iterator:
        for got in batches:
            pixels = got.images.to(self.device, non_blocking=True)
            yield got._replace(images=normalize_padded(pixels, got.sizes))


class TorchJpegPixels:
    """Streamed batches through ``TorchJpegImages.decode`` (nvJPEG on a GPU)."""

    def __init__(self, decoder, fallback: PilDecode):
        self.decoder, self.fallback = decoder, fallback
        self.said = False  # the one log line about images that are not JPEG

    def __call__(self, batches: Iterator) -> Iterator:
        for got in batches:
            try:
                images, sizes = self.decoder.decode(got.jpegs, got.flips)
            except RuntimeError as err:
                yield with_pil(got, self.fallback, f"{self.decoder.name}: {err}")
                continue
            if self.decoder.not_jpeg and not self.said:
                self.said = True
                log.warning(
                    "%s reads JPEG only: PNG / WebP images (first in a batch holding %s) are decoded with "
                    "PIL, then resized on the device (counted in the decoder's not_jpeg; said once)",
                    self.decoder.name,
                    got.keys,
                )
            yield got._replace(images=images, sizes=sizes)


def with_pil(got, decode: PilDecode, failure: str):
    """``got`` decoded with PIL, after the backend's decoder failed on it."""
    log.warning("%s failed on a batch holding %s; decoded with PIL instead", failure.split(":")[0], got.keys)
    images = []
    for jpeg, flip, key in zip(got.jpegs, got.flips, got.keys):
        try:
            images.append(decode(jpeg, flip, key))
        except ValueError as err:
            raise RuntimeError(
                f"{failure}; and PIL cannot decode {key} either ({err}), although the stream's JPEG check passed it"
            ) from None
    stacked, sizes = decode.pad(images)
    return got._replace(images=stacked, sizes=sizes)
