"""Streaming mode: ``data.train_shards`` names shards elsewhere (a brace pattern of URLs,
``pipe:CMD``, or local paths with braces) and they are read front to back, never indexed.

    data.train_shards="https://host/cc12m-{000000..001023}.tar" data.epoch_samples=10000000

URLs are opened by ``readers/stream_urls.py``: ``webdataset.gopen`` for http(s) (curl) and ``pipe:``
(a shell: trusted configs only), fsspec for ``s3://``, ``gs://`` ... (with ``s3fs``,
``gcsfs`` ...), where a folder or glob lists its ``.tar`` objects. The rules, all pure
functions of the config seed and the position, so the loader state is ``{epoch,
batches_done}`` as elsewhere:

* an epoch is ``data.epoch_samples`` samples over all ranks: ``epoch_samples // (W * B)``
  batches on every rank, whatever the shards hold, so collectives never hang;
* shard order: a permutation by ``(seed, epoch)``; rank ``r`` takes shards ``r, r + W..``
  and its worker ``w`` (of ``n``) every ``n``-th of those, cycling through them again if
  they run out before the epoch ends. With ``data.resampled`` each worker instead draws
  shards with replacement, by ``(seed, epoch, rank, worker)`` (OpenCLIP's resampling:
  fixed-size "epochs" over sets of any size);
* each worker reads ``data.shards_in_flight`` of its shards at once, one sample from each
  in turn, into a shuffle buffer of ``data.shuffle_buffer`` samples, seeded alike
  (``stream_mix.py``: why, and the memory it takes);
* worker ``w`` makes batches ``w, w + n, ...`` (the DataLoader's round robin); the state
  adds each worker's count of samples taken from its stream, so a resumed run skips
  them and yields the batches the uninterrupted run would have (same ``num_workers``: it
  is fingerprinted; with ``train.resume_universal`` another world size, worker count or
  batch size re-plans the epoch's rest at shard boundaries: ``stream_replan.py``). The
  skip costs no more reads than the buffer needs: which samples were taken and what the
  buffer held depend only on the shards' lengths, which the
  index sidecars give (one small read per shard), so the skip is replayed over positions
  and only the shards still holding buffered or later samples are read, those in flight
  up to where they were (without sidecars the skipped samples are read, never decoded);
* a read error (also a store's own type, e.g. botocore's EndpointConnectionError)
  reopens the shard after a back-off (``data.stream_retries`` times) and skips what was
  already read from it; a missing shard stops at once, naming its URL;
* a damaged sample is skipped (the next sample takes its place), counted in
  ``loader.damaged`` and named once: a JPEG that does not decode, or whose size or CRC32
  differs from its shard's index sidecar (``NAME.idx.npy`` next to ``NAME.tar``, fetched
  with it: ``stream_check.py``), which catches changed bytes that still decode. Shards
  without a sidecar (foreign webdataset shards, ``pipe:``) are checked by decoding only,
  said once (per rank); a sidecar that does not fit its shard stops the run naming it.

Pixels (``stream_pixels.py``): with ``data.backend=pil`` the workers decode; with dali
and nvjpeg they check each JPEG and hand its bytes to the rank's decoder, which gives
the same batches (keys, text, damage counts, loader state) and images that differ from
pil's only by decoder rounding.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Iterator, NamedTuple

import numpy as np
import torch

from pixelbert_dist.collectives import gather_objects
from pixelbert_dist.config import ConfigError
from pixelbert_dist.data.base import BatchAccounting, LoaderState
from pixelbert_dist.data.format.index import INDEX_COMMAND
from pixelbert_dist.data.format.members import DEFAULT_CAPTION_KEY
from pixelbert_dist.data.readers.stream_urls import expand, tar_folder
from pixelbert_dist.data.readers.stream_batches import StreamDataset
from pixelbert_dist.data.readers.stream_check import why_unchecked
from pixelbert_dist.data.readers.stream_replan import (
    StreamPosition,
    base_order,
    epoch_order,
    seeded_rng,
    start_position,
)
from pixelbert_dist.data.readers.stream_read import (
    SKIP_KINDS,
    TRUNCATED,
    Dotted,
    Raw,
)
from pixelbert_dist.data.readers.stream_mix import worker_samples
from pixelbert_dist.data.decode.torch_loader import data_loader

log = logging.getLogger("pixelbert_dist.data")


class StreamPlan(NamedTuple):
    urls: list
    seed: int
    epoch: int
    rank: int
    world_size: int
    batch_size: int
    batches: int  # per rank and epoch
    resampled: bool
    shuffle: bool
    buffer: int
    retries: int
    in_flight: int = 1  # shards a worker reads at once (data.shards_in_flight): stream_mix.py
    order: list | None = None  # the epoch's shard order after re-plans (stream_replan.py); None: none
    replans: int = 0  # re-plans in this epoch: they seed the new streams apart from the old ones
    caption_key: str = DEFAULT_CAPTION_KEY  # data.caption_key: which samples a sidecar may leave out (stream_read)

    def _words(self, worker: int, kind: int) -> tuple:
        return (self.seed, self.epoch, self.rank, worker, kind) + ((self.replans,) if self.replans else ())

    def own_shards(self, worker: int, workers: int) -> list:
        """The worker's shard list of this epoch (without resampling), in its order."""
        order = self.order
        if order is None:
            order = epoch_order(len(self.urls), self.seed, self.epoch, self.shuffle)
        return [self.urls[i] for i in order[self.rank :: self.world_size][worker::workers]]

    def shard_stream(self, worker: int, workers: int) -> Iterator[str]:
        if self.resampled:
            rng = seeded_rng(*self._words(worker, 3))
            while True:
                yield self.urls[int(rng.integers(len(self.urls)))]
        mine = self.own_shards(worker, workers)
        if not mine:
            raise ValueError(
                f"{len(self.urls)} shards cannot feed {self.world_size} ranks x "
                f"{workers} workers: use data.resampled=true or fewer workers"
            )
        while True:
            yield from mine

    def samples(
        self, worker: int, workers: int, errors: list, skip: int = 0, position: StreamPosition | None = None
    ) -> Iterator[Raw]:
        """This worker's samples, its shards mixed and shuffled (``stream_mix.py``), from
        its ``skip``-th on (a resume: only the shards still needed are read); ``position``
        follows where the stream stands in its shard list (a re-plan's input)."""
        return worker_samples(self, worker, workers, errors, skip, position)

    def start(self, worker: int, workers: int) -> tuple[np.random.Generator, Iterator[str]]:
        """The worker's shuffle-buffer generator and shard stream, both at their start."""
        return seeded_rng(*self._words(worker, 2)), self.shard_stream(worker, workers)


def url_digest(urls: list[str]) -> str:
    return hashlib.sha256("\n".join(urls).encode()).hexdigest()[:16]


def names_digest(urls: list[str]) -> str:
    """The shard list's file names in order, wherever they live (a moved copy keeps it)."""
    return url_digest([url.rstrip("/").rsplit("/", 1)[-1] for url in urls])


class StreamLoader(LoaderState, BatchAccounting):
    """One rank's batches from streamed shards (module docstring); a ``BatchLoader``."""

    resume_hint = (
        "the same shard URLs, world size, batch size, workers and data config (or pass "
        "train.resume_universal=true to re-plan the position at shard boundaries)"
    )
    damage_action = "skipped (the next sample in the stream takes its place)"

    def __init__(
        self,
        cfg,
        spec: str,
        text,
        images,
        batch_size: int,
        rank: int,
        world_size: int,
        train: bool,
        device: torch.device,
    ):
        if cfg.epoch_samples < world_size * batch_size:
            raise ConfigError(
                f"streaming needs data.epoch_samples >= world_size x batch_size "
                f"= {world_size * batch_size} (got {cfg.epoch_samples}): the "
                "number of samples that make one epoch over all ranks"
                + (
                    f"; or index the folder once (`{INDEX_COMMAND} {spec}`) to read it in the indexed mode"
                    if tar_folder(spec)
                    else ""
                )
            )
        self.cfg, self.urls = cfg, expand(spec)
        self.text, self.images = text, images  # a stream_pixels.StreamImages
        self.batch_size, self.rank, self.world_size, self.train = batch_size, rank, world_size, train
        self.backend = f"{images.name}-stream"
        self.read_errors = 0
        self.unchecked: str | None = None  # the first shard streamed without an index sidecar
        self.skipped = dict.fromkeys(SKIP_KINDS, 0)  # samples that never reached a batch, by kind
        self._said: set[str] = set()  # skip kinds, truncated tars and dotted names already logged
        self.workers = max(1, cfg.num_workers)
        if not cfg.resampled and len(self.urls) < world_size * self.workers:
            raise ConfigError(
                f"{len(self.urls)} shards cannot feed {world_size} ranks x "
                f"{self.workers} workers without repeats: set data.resampled=true "
                "or use fewer data.num_workers"
            )
        super().__init__()
        self._init_accounting(device)
        self._restart_streams()

    def _restart_streams(self) -> None:
        self.cursors = [0] * self.workers  # samples taken from each worker's stream
        self.positions = [start_position() for _ in range(self.workers)]  # StreamPosition snapshots, per stream
        self.replans: list[dict] = []  # this epoch's re-plans (stream_replan.py)

    def __len__(self) -> int:
        return self.cfg.epoch_samples // (self.world_size * self.batch_size)

    def _fingerprint(self) -> dict:
        return {
            "stream": url_digest(self.urls),
            "epoch_samples": self.cfg.epoch_samples,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "seed": self.cfg.seed,
            "shuffle": self.train and self.cfg.shuffle,
            "resampled": self.cfg.resampled,
            "shuffle_buffer": self.cfg.shuffle_buffer,
            "shards_in_flight": self.cfg.shards_in_flight if self.train and self.cfg.shuffle else 1,
            "num_workers": self.cfg.num_workers,
        }

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            super().set_epoch(epoch)
            self._restart_streams()

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "stream_cursors": list(self.cursors),
            "stream_positions": list(self.positions),
            "stream_replans": list(self.replans),
            "stream_urls": len(self.urls),
            "stream_names": names_digest(self.urls),
        }

    def gathered_state(self) -> dict:
        """Every rank's stream positions, for rank 0's copy of the state (a collective):
        what a resume on another world size re-plans from (``stream_replan.py``)."""
        return {"stream_ranks": gather_objects(list(self.positions))}

    def load_state_dict(self, state: dict) -> None:
        if state.get("stream") not in (None, url_digest(self.urls)):
            if state.get("stream_names") != names_digest(self.urls):
                raise ValueError(
                    f"data loader state was saved over another shard list ({state.get('stream_urls', '?')} "
                    f"URLs, digest {state['stream']}) than data.train_shards names now ({len(self.urls)} URLs, "
                    f"digest {url_digest(self.urls)}): a streamed position holds only over the same shard "
                    "files, in the same order (moved elsewhere, they may keep their names)"
                )
            log.warning(
                "resuming a streamed position over the same %d shard names at other URLs (now %s ...): "
                "they must be the same files as before the move",
                len(self.urls),
                self.urls[0],
            )
            state = {**state, "stream": url_digest(self.urls)}
        state = {"shards_in_flight": 1, **state}  # saved before shards were mixed: one at a time
        epoch, done = self.epoch, self.batches_done
        super().load_state_dict(state)  # the fingerprint (num_workers too) first
        cursors = state.get("stream_cursors")
        if not isinstance(cursors, list) or len(cursors) != self.workers:
            self.epoch, self.batches_done = epoch, done
            raise ValueError(
                f"data loader state has no 'stream_cursors' for {self.workers} "
                f"workers (got {cursors!r}); resume with {self.resume_hint}"
            )
        self.cursors = [int(c) for c in cursors]
        self.positions = list(state.get("stream_positions") or [start_position() for _ in range(self.workers)])
        self.replans = list(state.get("stream_replans") or [])

    def plan(self) -> StreamPlan:
        return StreamPlan(
            self.urls,
            self.cfg.seed,
            self.epoch,
            self.rank,
            self.world_size,
            self.batch_size,
            len(self),
            self.cfg.resampled,
            self.train and self.cfg.shuffle,
            self.cfg.shuffle_buffer,
            self.cfg.stream_retries,
            self.cfg.shards_in_flight,
            self._order(),
            len(self.replans),
            self.cfg.caption_key,
        )

    def _order(self) -> list | None:
        """The epoch's shard order after its re-plans; None when it has none (or draws shards)."""
        if not self.replans or self.cfg.resampled:
            return None
        return base_order(len(self.urls), self.cfg.seed, self.epoch, self.train and self.cfg.shuffle, self.replans)

    def __iter__(self) -> Iterator[dict]:
        if self.batches_done >= len(self):
            self.batches_done = 0
            self._restart_streams()
        start = self.batches_done
        flip_of = self.text.flip_rule(self.epoch)
        dataset = StreamDataset(
            self.plan(), start, list(self.cursors), flip_of, self.images.prepare, self.cfg.caption_key
        )
        # the workers start here, before any decoder thread exists in this process
        pin = self.device.type == "cuda"  # an async copy to the GPU
        batches = iter(data_loader(dataset, self.cfg.num_workers, self.cfg.prefetch, pin))
        if self.images.pixels is not None:
            batches = self.images.pixels(batches)
        for k, got in enumerate(batches, start):
            self._log_read_errors(got.read_errors)
            self._log_unchecked(got.unchecked)
            self._record_skips(got.skipped, got.dotted)
            self.cursors[k % self.workers] += got.taken
            self.positions[k % self.workers] = got.position
            batch = self.text(got.keys, got.metas, got.flips, [False] * len(got.keys), k, self.epoch)
            batch["images"], batch["image_sizes"] = got.images, got.sizes
            batch["damaged"] = self._record_damage(got.damaged)
            self._count_pixels(got.images, got.sizes)
            self.batches_done = k + 1
            yield self._to_device(batch)

    def _log_read_errors(self, errors: list) -> None:
        for line in errors:
            self.read_errors += 1
            log.warning("stream read error (retried with back-off): %s", line)

    def _record_skips(self, skipped: list, dotted: Dotted | None) -> None:
        """Count what never became a sample; one log line per kind (and per cut tar)."""
        for note in skipped:
            self.skipped[note.kind] += 1
            said = note.where if note.kind == TRUNCATED else note.kind
            if said not in self._said:
                self._said.add(said)
                log.warning(
                    "skipped %s: %s: %s (counted in loader.skipped[%r] and metrics.jsonl's skipped_%s; %s)",
                    note.kind.replace("_", " "),
                    note.where,
                    note.detail,
                    note.kind,
                    note.kind,
                    "each cut tar is named once" if note.kind == TRUNCATED else "said once per kind",
                )
        if dotted is not None and "dotted" not in self._said:
            self._said.add("dotted")
            log.warning(
                "tar member %r (%s) has dots in its name: by webdataset's rule its key is %r (everything "
                "up to the first dot of the base name) and its field %r (the type is the last part); "
                "said once for all such members",
                dotted.name,
                dotted.url,
                dotted.key,
                dotted.field,
            )

    def _log_unchecked(self, url: str | None) -> None:
        if url is not None and self.unchecked is None:
            self.unchecked = url
            log.warning(
                "streamed shard %s has no index sidecar (%s): it and any other such shard "
                "are checked by decoding only, which misses changed bytes that still decode "
                "(`make_shards.py` writes sidecars; said once)",
                url,
                why_unchecked(url),
            )
