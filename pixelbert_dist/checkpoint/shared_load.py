"""A resume that reads only what each rank needs.

DeepSpeed's ``load_checkpoint`` makes every rank read ``mp_rank_00_model_states.pt``
whole (the replicated model under ZeRO 0-2, plus the client state): W reads of the same
file, 142 GB summed over 512 ranks for R50. During a load, ``SharedFileEngine`` stands in
for DeepSpeed's checkpoint engine: a file that no single rank owns is read by rank 0 and
broadcast (the interconnect instead of W readers on one file system); a rank's own file
(``zero_pp_rank_R_...``) is read by that rank alone, as before. DeepSpeed also reads the
model file twice (once only to check its ``mp_world_size``): the second read of a path
within one load is served from the first. ``bytes_read`` counts the checkpoint bytes this
rank read from the file system, for the log and the benchmark.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager

import torch.distributed as tdist
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

from pixelbert_dist.checkpoint import files

_OWNED = re.compile(r"zero_pp_rank_\d+_")


class SharedFileEngine(CheckpointEngine):
    """DeepSpeed's checkpoint-engine interface for loading: shared files once, then broadcast."""

    def __init__(self, real: CheckpointEngine):
        super().__init__()
        self.name = "SharedFileEngine"
        self.real = real
        self.bytes_read = 0
        self._held: dict[str, object] = {}  # a path read once in this load: DeepSpeed asks twice

    def _read(self, path: str, map_location):
        self.bytes_read += os.path.getsize(path)
        return self.real.load(path, map_location=map_location)

    def load(self, path: str, map_location=None):
        if path in self._held:
            return self._held.pop(path)
        self._held[path] = self._load_once(path, map_location)
        return self._held[path]

    def _load_once(self, path: str, map_location):
        shared = not _OWNED.search(os.path.basename(path))
        if not shared or not tdist.is_initialized() or tdist.get_world_size() == 1:
            return self._read(path, map_location)
        box = [self._read(path, "cpu") if files.rank() == 0 else None]
        tdist.broadcast_object_list(box, src=0)  # every rank calls load for a shared file, in the same order
        return box[0]

    def create(self, info) -> None:
        pass

    def save(self, state_dict, path: str) -> None:
        raise NotImplementedError("the shared-file engine only loads")

    def commit(self, info) -> bool:
        return True


@contextmanager
def shared_file_reads(engine):
    """``engine.load_checkpoint`` inside reads each shared file once (rank 0)."""
    real = engine.checkpoint_engine
    shared = SharedFileEngine(real)
    engine.checkpoint_engine = shared
    try:
        yield shared
    finally:
        engine.checkpoint_engine = real
