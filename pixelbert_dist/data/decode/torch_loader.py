"""The torch image paths: PIL in DataLoader worker processes, and nvJPEG through
``torchvision.io.decode_jpeg(device="cuda")``.

Both apply the size rule of ``images.resized_size`` with an antialiased bilinear
(triangle) filter, as the DALI path does, so all backends give the same shapes and
pixels that differ only by decoder rounding.

The PIL workers pad each batch once, into a buffer made in shared memory
(``images.pad_pixels``), so handing it over copies nothing. For a GPU the batch is
uint8, pinned, and normalised on the GPU (``images.normalize_padded``), as DALI does: a
float32 batch is 4x the bytes (173 MB at 8 x 1344 x 1344) to pin and copy. For the CPU
the workers normalise each image in its slot, in parallel, where the rank's process
would do it alone. Either way the numbers are those of ``pil_image`` (a test). Before,
each image was normalised from its HWC view, padded by ``pad_batch`` and copied into
shared memory by the DataLoader (benchmarks/bench_loader_peer.py measures both).
"""

from __future__ import annotations

import atexit
import io
import signal
import warnings
import weakref
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from pixelbert_dist.data.decode.damage import DecodedBatch, resolve, without_jpeg
from pixelbert_dist.data.decode.images import (
    normalize_hwc_uint8,
    normalize_padded,
    pad_batch,
    pad_pixels,
    resized_size,
)

Work = Sequence[Sequence[tuple[int, bool]]]  # per batch: (sample index, flip)
JPEG_MAGIC = b"\xff\xd8"


def pil_pixels(jpeg: bytes, shorter: int, max_size: int, flip: bool, where: str = "") -> np.ndarray:
    """One resized (and maybe flipped) HWC uint8 RGB image from image bytes (read-only)."""
    try:
        with Image.open(io.BytesIO(jpeg)) as img:
            img = img.convert("RGB")
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot decode JPEG {where}: {err}") from None
    height, width = resized_size(img.height, img.width, shorter, max_size)
    pixels = np.asarray(img.resize((width, height), Image.Resampling.BILINEAR))
    return pixels[:, ::-1] if flip else pixels  # a view: the copy into the batch flips it


def pil_image(jpeg: bytes, shorter: int, max_size: int, flip: bool, where: str = "") -> torch.Tensor:
    """One normalised CHW float image from JPEG bytes (a reference for the tests)."""
    return normalize_hwc_uint8(torch.from_numpy(pil_pixels(jpeg, shorter, max_size, flip, where).copy()))


class PilDecode:
    """``decode(jpeg, flip, where)``: ``pil_pixels`` with the configured sizes, and
    ``pad(images)``: their batch, normalised or uint8 (picklable, for workers)."""

    makes_pixels = True  # streaming: the workers hand over images, not JPEG bytes

    def __init__(self, shorter: int, max_size: int, normalize: bool = True):
        self.shorter, self.max_size, self.normalize = shorter, max_size, normalize

    def __call__(self, jpeg: bytes, flip: bool, where: str = "") -> np.ndarray:
        return pil_pixels(jpeg, self.shorter, self.max_size, flip, where)

    def pad(self, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_pixels(images, self.normalize)


class _PilBatchDataset(torch.utils.data.Dataset):
    """Item i = the decoded, padded images of work batch i (one worker per batch)."""

    def __init__(self, index, work: Work, shorter: int, max_size: int, normalize: bool):
        self.index, self.work = index, list(work)
        self.shorter, self.max_size, self.normalize = shorter, max_size, normalize

    def __len__(self) -> int:
        return len(self.work)

    def __getitem__(self, i: int):
        images = [
            pil_pixels(self.index.jpeg(s), self.shorter, self.max_size, flip, where=self.index.samples[s].key)
            for s, flip in self.work[i]
        ]
        return pad_pixels(images, self.normalize)


class _PilSampleDataset(torch.utils.data.Dataset):
    """Item j = batch j of sample indices, decoded with damaged samples replaced
    (``damage.resolve``, with the decode itself as the last check)."""

    def __init__(self, index, batches, flip_of, shorter: int, max_size: int, normalize: bool):
        self.index, self.batches, self.flip_of = index, batches, flip_of
        self.shorter, self.max_size, self.normalize = shorter, max_size, normalize

    def __len__(self) -> int:
        return len(self.batches)

    def _decode(self, sample) -> np.ndarray:
        return pil_pixels(
            sample.jpeg,
            self.shorter,
            self.max_size,
            self.flip_of(sample.key),
            where=self.index.where(sample.index, sample.key),
        )

    def __getitem__(self, j: int) -> DecodedBatch:
        images, used, events = [], [], []
        for i in self.batches[j]:
            sample, image, damaged = resolve(self.index, int(i), self._decode)
            images.append(image)
            used.append(without_jpeg(sample))
            events += damaged
        stacked, sizes = pad_pixels(images, self.normalize)
        return DecodedBatch(stacked, sizes, used, [self.flip_of(s.key) for s in used], events)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
_LIVE_ITERATORS: weakref.WeakSet = weakref.WeakSet()  # this process's iterators with workers
_WORKERS: weakref.WeakSet = weakref.WeakSet()  # their worker processes (multiprocessing keeps live ones)


def _stop_signal_in_worker(signum, frame) -> None:
    """A stop signal that reached a loader worker (Slurm signals every process of a job
    step, Ctrl-C the whole foreground group): the worker carries on, the trainer's own
    process stops at a step boundary and then ends its workers."""


def _leave_stops_to_the_trainer(worker_id: int) -> None:
    # Torch's worker handler dies on a SIGTERM not sent by its parent (the default action
    # for SIGUSR1 too), and the trainer's next batch then raises "DataLoader worker is
    # killed by signal" instead of saving. A Python handler, not SIG_IGN, so that commands
    # the worker starts (curl, pipe:) keep the default actions.
    for sig in STOP_SIGNALS:
        signal.signal(sig, _stop_signal_in_worker)


@atexit.register  # after multiprocessing's own exit hook is registered, so it runs first
def _end_live_workers() -> None:
    """At interpreter exit multiprocessing terminates daemonic children, then joins them:
    workers that outlive SIGTERM would hang the exit. Shut every live iterator's workers
    down the way the DataLoader does (they see the done event and leave), then kill any
    that did not, also those of iterators already gone (a worker busy in a read when its
    DataLoader shut down outlives the SIGTERM that was meant to end it)."""
    for iterator in list(_LIVE_ITERATORS):
        iterator._shutdown_workers()
    for worker in list(_WORKERS):
        if worker.is_alive():
            worker.kill()


class _Loader(torch.utils.data.DataLoader):
    def _get_iterator(self):
        iterator = super()._get_iterator()
        if self.num_workers > 0:
            _LIVE_ITERATORS.add(iterator)
            _WORKERS.update(getattr(iterator, "_workers", []))
        return iterator


def data_loader(dataset, num_workers: int, prefetch: int, pin_memory: bool):
    extra = {"prefetch_factor": prefetch, "persistent_workers": False} if num_workers > 0 else {}
    if num_workers > 0:
        extra["worker_init_fn"] = _leave_stops_to_the_trainer
    # batch_size=None: each item is already a batch; order is kept by the DataLoader.
    # Its own generator: a DataLoader iterator otherwise draws its worker seed from
    # torch's global RNG, which would shift the model's dropout / pixel-sampling
    # stream whenever an epoch starts (and so break exact resume mid-epoch).
    return _Loader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        generator=torch.Generator(),
        pin_memory=pin_memory,
        **extra,
    )


class PilImages:
    """PIL decode in ``num_workers`` DataLoader processes (0: in the calling process)."""

    name = "pil"

    def __init__(
        self,
        index,
        batch_size: int,
        shorter: int,
        max_size: int,
        num_workers: int = 2,
        prefetch: int = 2,
        device: str | torch.device = "cpu",
    ):
        self.index, self.shorter, self.max_size = index, shorter, max_size
        self.num_workers, self.prefetch = num_workers, prefetch
        self.device = torch.device(device)
        self.pin_memory = self.device.type == "cuda"  # faster, async copy to GPU
        # uint8 batches normalised on the GPU; the CPU's are normalised in the workers
        self.uint8_batches = self.device.type == "cuda"

    def _normalized(self, pixels: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        if not self.uint8_batches:
            return pixels
        return normalize_padded(pixels.to(self.device, non_blocking=True), sizes)

    def batches(self, work: Work) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Exactly the given (index, flip) samples; a damaged one raises, named."""
        if not work:
            return
        dataset = _PilBatchDataset(self.index, work, self.shorter, self.max_size, not self.uint8_batches)
        for pixels, sizes in data_loader(dataset, self.num_workers, self.prefetch, self.pin_memory):
            yield self._normalized(pixels, sizes), sizes

    def samples(self, batches, flip_of) -> Iterator[DecodedBatch]:
        """Batches of sample indices, damaged samples replaced (the Loader's path)."""
        if not len(batches):
            return
        dataset = _PilSampleDataset(self.index, batches, flip_of, self.shorter, self.max_size, not self.uint8_batches)
        for got in data_loader(dataset, self.num_workers, self.prefetch, self.pin_memory):
            yield got._replace(images=self._normalized(got.images, got.sizes))


class TorchJpegImages:
    """``torchvision.io.decode_jpeg`` on a whole batch, resize with antialiased bilinear
    interpolation on the same device. On "cuda" this is the nvjpeg backend; "cpu" is
    kept for tests of the resize/pad path on machines without a GPU."""

    def __init__(self, index, batch_size: int, shorter: int, max_size: int, device: str | torch.device = "cuda"):
        self.index, self.shorter, self.max_size = index, shorter, max_size
        self.device = torch.device(device)
        self.name = "nvjpeg" if self.device.type == "cuda" else "torchvision-cpu"
        self.not_jpeg = 0  # PNG / WebP images decoded by PIL instead

    def _one(self, image: torch.Tensor, flip: bool) -> torch.Tensor:
        height, width = resized_size(image.shape[1], image.shape[2], self.shorter, self.max_size)
        resized = torch.nn.functional.interpolate(
            image[None].float(), size=(height, width), mode="bilinear", antialias=True, align_corners=False
        )[0]
        # Round and clamp like an 8-bit resize would, so values match PIL and DALI.
        resized = resized.round_().clamp_(0, 255)
        if flip:
            resized = resized.flip(-1)
        return normalize_hwc_uint8(resized.permute(1, 2, 0))

    def decode(self, jpegs: list[bytes], flips: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
        """One padded batch from image bytes (also the streaming loader's path). nvJPEG
        reads JPEG only: a PNG or WebP (foreign shards) is decoded by PIL, counted in
        ``not_jpeg``, and resized here like the others."""
        from torchvision.io import ImageReadMode, decode_jpeg

        is_jpeg = [jpeg[:2] == JPEG_MAGIC for jpeg in jpegs]
        data = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j, ok in zip(jpegs, is_jpeg) if ok]
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its codecs for TorchCodec; decode_jpeg on
            # CUDA is still the batched nvJPEG path this backend exists for.
            warnings.simplefilter("ignore", DeprecationWarning)
            decoded = iter(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device) if data else [])
        images = [next(decoded) if ok else self._pil(jpeg) for jpeg, ok in zip(jpegs, is_jpeg)]
        return pad_batch([self._one(img, flip) for img, flip in zip(images, flips)])

    def _pil(self, data: bytes) -> torch.Tensor:
        """A non-JPEG image as uint8 CHW on the device, through PIL."""
        try:
            with Image.open(io.BytesIO(data)) as img:
                pixels = np.asarray(img.convert("RGB")).copy()
        except (OSError, ValueError) as err:
            raise RuntimeError(f"cannot decode a non-JPEG image with PIL: {err}") from None
        self.not_jpeg += 1
        return torch.from_numpy(pixels).permute(2, 0, 1).to(self.device)

    def batches(self, work: Work) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in work:
            yield self.decode([self.index.jpeg(s) for s, _ in batch], [flip for _, flip in batch])

    def samples(self, batches, flip_of) -> Iterator[DecodedBatch]:
        """The Loader's path: samples that fail the index checks are replaced (an
        undecodable JPEG with intact bytes still fails the batch decode here)."""
        for indices in batches:
            resolved = [resolve(self.index, int(i)) for i in indices]
            used = [sample for sample, _, _ in resolved]
            flips = [flip_of(s.key) for s in used]
            images, sizes = next(self.batches([[(s.index, f) for s, f in zip(used, flips)]]))
            yield DecodedBatch(
                images, sizes, [without_jpeg(s) for s in used], flips, [e for _, _, events in resolved for e in events]
            )


def nvjpeg_images(
    index, batch_size: int, shorter: int, max_size: int, device: str | torch.device = "cuda"
) -> TorchJpegImages:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(
            f"data.backend='nvjpeg' decodes on the GPU and needs CUDA "
            f"(device={str(device)!r}, cuda available: "
            f"{torch.cuda.is_available()}); use data.backend='dali' "
            "(CPU decode) or 'pil' on this machine"
        )
    return TorchJpegImages(index, batch_size, shorter, max_size, device)
