"""One rank's streamed batches in its loader workers (``stream.py``): worker ``i`` of ``n``
plays stream ``(i + start) % n`` and makes every ``n``-th batch from its samples, checking
(or decoding) each image; what never became a sample, and where the stream stands in its
shard list after each batch (a re-plan's input, ``stream_replan.py``), ride along."""

from __future__ import annotations

from typing import Iterator, NamedTuple

import torch

from pixelbert_dist.data.decode.damage import Damaged
from pixelbert_dist.data.format.members import NoCaption, caption_meta
from pixelbert_dist.data.readers.stream_read import NO_CAPTION, Dotted, Skipped
from pixelbert_dist.data.readers.stream_replan import StreamPosition


class StreamBatch(NamedTuple):
    images: torch.Tensor | None  # None until the rank's decoder fills it (dali, nvjpeg)
    sizes: torch.Tensor | None
    keys: list
    metas: list
    flips: list
    damaged: list
    read_errors: list
    jpegs: list  # the checked bytes, for a decoder in the rank's process; else empty
    unchecked: str | None  # a shard in this batch without an index sidecar (for one log line)
    taken: int = 0  # samples taken from the worker's stream for this batch
    skipped: list = []  # Skipped: what never became a sample (counted by kind)
    dotted: Dotted | None = None  # a member name cut by webdataset's key rule (for one log line)
    position: list = []  # the stream's StreamPosition snapshot after this batch (a re-plan's input)


class StreamDataset(torch.utils.data.IterableDataset):
    """Worker ``i`` of ``n`` plays stream ``v = (i + start) % n``: the DataLoader's round
    robin begins at worker 0, and batch ``start`` is stream ``start % n``'s. ``plan``: the
    rank's ``stream.StreamPlan`` (not imported: that module imports this one)."""

    def __init__(self, plan, start: int, cursors: list, flip_of, prepare, caption_key: str):
        self.plan, self.start, self.cursors = plan, start, cursors
        self.flip_of, self.prepare = flip_of, prepare  # PilDecode or JpegCheck
        self.caption_key = caption_key

    def __iter__(self) -> Iterator[StreamBatch]:
        info = torch.utils.data.get_worker_info()
        real, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        virtual = (real + self.start) % workers
        errors: list[str] = []
        position = StreamPosition()
        stream = self.plan.samples(virtual, workers, errors, self.cursors[virtual], position)  # never decoded
        first = self.start + (virtual - self.start) % workers
        for _ in range(first, self.plan.batches, workers):
            yield self._batch(stream, errors)._replace(position=position.snapshot())

    def _batch(self, stream, errors: list) -> StreamBatch:
        prepared, keys, metas, flips, damaged, skipped, unchecked = [], [], [], [], [], [], None
        taken = 0
        while len(prepared) < self.plan.batch_size:  # taken = batch_size + damaged + captionless
            raw = next(stream)
            taken += 1
            where = f"{raw.url}:{raw.key}"
            if raw.damage is not None:  # the index check, before decoding: same on every backend
                damaged.append(Damaged(where, raw.damage, -1))
                continue
            try:
                meta = caption_meta(raw.text, raw.meta, self.caption_key)
            except NoCaption as err:
                skipped.append(Skipped(NO_CAPTION, where, str(err)))
                continue
            unchecked = unchecked or (None if raw.checked else raw.url)
            flip = self.flip_of(raw.key)
            try:
                prepared.append(self.prepare(raw.jpeg, flip, raw.key))
            except (ValueError, OSError) as err:
                damaged.append(Damaged(where, f"undecodable image ({err})", -1))
                continue
            keys.append(raw.key)
            metas.append(meta)
            flips.append(flip)
        notes, errors[:] = list(errors), []
        read_errors = [note for note in notes if isinstance(note, str)]
        skipped += [note for note in notes if isinstance(note, Skipped)]
        dotted = next((note for note in notes if isinstance(note, Dotted)), None)
        tail = (taken, skipped, dotted)
        if not self.prepare.makes_pixels:
            return StreamBatch(None, None, keys, metas, flips, damaged, read_errors, prepared, unchecked, *tail)
        stacked, sizes = self.prepare.pad(prepared)
        return StreamBatch(stacked, sizes, keys, metas, flips, damaged, read_errors, [], unchecked, *tail)
