"""The DALI image path: JPEG decode (nvJPEG on GPU, libjpeg-turbo on CPU), resize,
flip, normalise and pad to x64, all inside one DALI pipeline.

Why ``fn.external_source`` feeding the raw JPEG bytes rather than
``fn.readers.webdataset``: the reader shuffles only inside an ``initial_fill`` buffer of
each rank's contiguous slice, cannot follow the global per-epoch permutation that the
PIL and nvjpeg backends use, and its exact resume needs DALI's own checkpoint blob.
Feeding the bytes from ``readers.plan.epoch_plan`` keeps every backend on the same samples,
makes the loader state two integers, and leaves DALI the expensive part (decode and
resize on its thread pool or on the GPU). The flip decision comes in as an input
because the caption must be swapped to match it.

Damaged samples: the bytes are checked (``damage.resolve``) before DALI sees them. A
JPEG that passes the checks but that DALI cannot decode fails the whole batch and
leaves the pipeline unusable; the batches in flight are then decoded with PIL to find
the culprits, which are replaced as the PIL backend would replace them, and a new
pipeline starts at the first batch not yet yielded.

Shard reads: the feeds read the bytes on a reader thread (``read_ahead.prefetched``,
``prefetch`` batches ahead), so ``source()``, which DALI calls on the trainer's main
thread inside ``pipe.run()``, only pops batches whose reads are done. The reader is
stopped (joined) before ``samples`` looks at the failed batch and adds to
``known_bad``, which the reader reads; ``ShardIndex`` locks its open-shard LRUs.
"""

from __future__ import annotations

import io
from collections import deque
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from pixelbert_dist.data.decode.damage import DecodedBatch, resolve, without_jpeg
from pixelbert_dist.data.decode.images import MEAN_255, STD_255, padded_batch_size
from pixelbert_dist.data.decode.pad_window import pad_window
from pixelbert_dist.data.decode.read_ahead import prefetched

Work = Sequence[Sequence[tuple[int, bool]]]  # per batch: (sample index, flip)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _build_pipeline(
    source, batch_size: int, shorter: int, max_size: int, num_threads: int, prefetch: int, device_id: int | None
):
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None

    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        prefetch_queue_depth=prefetch,
        exec_dynamic=True,
    )
    def pipe():
        jpegs, mirror, window_h, window_w, anchor_x = fn.external_source(
            source=source, num_outputs=5, batch=True, dtype=[types.UINT8, types.INT32] + [types.FLOAT] * 3
        )
        images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
        # Antialiased linear (a triangle filter when shrinking): what PIL's BILINEAR does,
        # so the backends agree to within JPEG-decoder differences.
        images = fn.resize(
            images, resize_shorter=shorter, max_size=max_size, antialias=True, interp_type=types.INTERP_LINEAR
        )
        sizes = images.shape()
        # Normalise straight into the padded batch (pad_window.py): a window of the
        # batch's padded size at the top left, zeros (after normalisation) outside the
        # image. The mirror flips the whole window, so a flipped image's window starts
        # at x = width - window_w (anchor 1), which puts the image back at the left.
        # ``mirror`` and the window stay CPU argument inputs even when the images are on the GPU.
        images = fn.crop_mirror_normalize(
            images,
            mirror=mirror,
            mean=list(MEAN_255),
            std=list(STD_255),
            output_layout="CHW",
            dtype=types.FLOAT,
            crop_h=window_h,
            crop_w=window_w,
            crop_pos_x=anchor_x,
            crop_pos_y=0.0,
            out_of_bounds_policy="pad",
            fill_values=0.0,
        )
        return images, sizes

    return pipe()


def _to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = tensor_list.as_tensor()
        out = torch.empty(dense.shape(), dtype=torch.float32, device=device)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    # No copy: the dynamic executor (exec_dynamic) hands each output's buffer over for
    # as long as it is referenced, as DALI's own PyTorch iterator relies on. A numpy copy
    # of the 140 MB float batch (freshly mapped pages each time) cost ~1/3 of the CPU.
    return torch.from_dlpack(tensor_list.as_tensor())


def _padded(images: torch.Tensor, sizes: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """The batch padded to its own size from one padded to ``window`` (the same batch
    where the headers told the decoded sizes right, the usual case)."""
    want = padded_batch_size(sizes.numpy())
    if want == window:
        return images
    if want[0] > window[0] or want[1] > window[1]:
        raise RuntimeError(
            f"DALI decoded images of sizes {sizes.tolist()}, larger than their headers said "
            f"(padded window {window}): their pixels would be cut"
        )
    return images[:, :, : want[0], : want[1]].contiguous()


class DaliImages:
    """Decodes the batches of a work list with one DALI pipeline (rebuilt per pass, so a
    pass that was abandoned half way never leaves prefetched batches behind)."""

    def __init__(
        self,
        index,
        batch_size: int,
        shorter: int,
        max_size: int,
        num_threads: int = 2,
        prefetch: int = 2,
        device: str | torch.device = "cpu",
    ):
        if not dali_available():
            raise RuntimeError(
                "data.backend='dali' needs NVIDIA DALI (pip install "
                "nvidia-dali-cuda130); use data.backend='pil' without it"
            )
        self.index, self.batch_size = index, batch_size
        self.shorter, self.max_size = shorter, max_size
        self.num_threads, self.prefetch = max(1, num_threads), max(1, prefetch)
        self.device = torch.device(device)
        self.device_id = (self.device.index or 0) if self.device.type == "cuda" else None
        self.name = "dali-gpu" if self.device_id is not None else "dali-cpu"

    def batches(self, work: Work) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Exactly the given (index, flip) samples; a batch DALI cannot decode raises."""

        def feed():
            for batch in work:
                yield None, [self.index.jpeg(i) for i, _ in batch], [flip for _, flip in batch]

        failures: list[str] = []
        ahead = prefetched(feed(), self.prefetch)
        try:
            for _, images, hw in self.decode(ahead, deque(), failures):
                yield images, hw
        finally:
            ahead.close()
        if failures:
            raise RuntimeError(failures[0])

    def samples(self, batches, flip_of) -> Iterator[DecodedBatch]:
        """Batches of sample indices, damaged samples replaced (module docstring)."""
        known_bad: dict[int, str] = {}
        done = 0
        while done < len(batches):
            in_flight: deque = deque()
            failures: list[str] = []
            for batch in self._run(batches, done, flip_of, known_bad, in_flight, failures):
                done += 1
                yield batch
            if failures and not _find_undecodable(in_flight, known_bad):
                raise RuntimeError(
                    f"DALI failed on a batch holding "
                    f"{[s.key for rows, _, _ in in_flight for s, _ in rows]}, and PIL "
                    f"decodes every one of them: {failures[0]}"
                )

    def _run(self, batches, start: int, flip_of, known_bad: dict, in_flight: deque, failures: list):
        """The batches from ``start`` on, through ``decode``."""

        def feed():
            for k in range(start, len(batches)):
                rows = [resolve(self.index, int(i), known_bad=known_bad)[::2] for i in batches[k]]
                yield rows, [s.jpeg for s, _ in rows], [flip_of(s.key) for s, _ in rows]

        ahead = prefetched(feed(), self.prefetch)
        try:
            for rows, images, hw in self.decode(ahead, in_flight, failures):
                used = [s for s, _ in rows]
                yield DecodedBatch(
                    images,
                    hw,
                    [without_jpeg(s) for s in used],
                    [flip_of(s.key) for s in used],
                    [e for _, events in rows for e in events],
                )
        finally:
            ahead.close()  # before ``samples`` writes to known_bad, which the reader reads

    def decode(self, feed: Iterator[tuple], in_flight: deque, failures: list) -> Iterator[tuple]:
        """``(payload, images, sizes)`` for each ``(payload, jpegs, flips)`` of ``feed``,
        from one pipeline (also the streaming loader's path). On a failed batch return
        quietly, with the error in ``failures`` and the items fed but not yielded in
        ``in_flight``; ``feed`` is left where it was, for a new call to go on."""

        windows: deque = deque()  # the padded window of each batch fed, in order

        def source():
            item = next(feed)  # StopIteration ends the pipeline's epoch
            in_flight.append(item)
            _, jpegs, flips = item
            window = pad_window(jpegs, self.shorter, self.max_size)
            windows.append(window)
            height, width = [np.float32(window[0])] * len(jpegs), [np.float32(window[1])] * len(jpegs)
            return (
                [np.frombuffer(j, dtype=np.uint8) for j in jpegs],
                [np.int32(f) for f in flips],
                height,
                width,
                [np.float32(bool(f)) for f in flips],
            )

        pipe = _build_pipeline(
            source, self.batch_size, self.shorter, self.max_size, self.num_threads, self.prefetch, self.device_id
        )
        pipe.build()
        try:
            while True:
                try:
                    images, sizes = pipe.run()
                except StopIteration:
                    return
                except RuntimeError as err:
                    # the message only: the exception's traceback would keep the failed
                    # pipeline (and its threads) alive, and a DataLoader forked later in
                    # this process could then deadlock on a lock one of them held
                    failures.append(str(err) or repr(err))
                    return
                payload = in_flight.popleft()[0]
                hw = torch.tensor(np.stack([np.asarray(s)[:2] for s in sizes]), dtype=torch.int64)
                yield payload, _padded(_to_torch(images, self.device), hw, windows.popleft()), hw
        finally:
            del pipe


def _find_undecodable(in_flight: deque, known_bad: dict) -> bool:
    """Decode the in-flight samples with PIL; mark the failures. True if any found."""
    found = False
    for rows, _, _ in in_flight:
        for sample, _ in rows:
            try:
                with Image.open(io.BytesIO(sample.jpeg)) as img:
                    img.convert("RGB")
            except (OSError, ValueError) as err:
                known_bad[sample.index] = f"undecodable JPEG ({err})"
                found = True
    return found
