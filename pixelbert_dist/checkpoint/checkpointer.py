"""``Checkpointer``: the one component the training loop calls for checkpoints.

It owns the run folder (``RUN_DIR/checkpoints``, the lock, the run's record), picks and
verifies the checkpoint to resume, saves (when a step is due, synchronously or in the
background), keeps the last N and mirrors each finished checkpoint to a remote URL. The
loop only says what to save and applies what a resume returns::

    checkpointer = Checkpointer(run_dir, keep_last=3, every_steps=500, every_minutes=30)
    checkpointer.take_folder()
    tag_dir = checkpointer.choose("auto", ds_config, world_size)   # before deepspeed.initialize
    checkpointer.attach(engine)
    client = checkpointer.resume()                                   # None: a fresh run
    ...
    if checkpointer.due(step, minutes_due):
        checkpointer.save(step, client_state, rank_state, meta)
    checkpointer.close()                                             # waits for a save in flight
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from pixelbert_dist.checkpoint import engine_io, files
from pixelbert_dist.checkpoint.choose import check_world_size, find_checkpoint, prepare_resume
from pixelbert_dist.checkpoint.files import CheckpointError
from pixelbert_dist.checkpoint.layout import read_latest, tag_for
from pixelbert_dist.checkpoint.mirror import Mirror
from pixelbert_dist.checkpoint.staging import HostBuffers
from pixelbert_dist.checkpoint.run_folder import RunFolderError, RunLock, record_config, supersede_rows
from pixelbert_dist.checkpoint.universal import to_universal
from pixelbert_dist.checkpoint.writer import BackgroundWriter
from pixelbert_dist.collectives import gather_objects

log = logging.getLogger(__name__)


class Checkpointer:
    """Checkpoints of one run in ``RUN_DIR/checkpoints``; every method is called on every
    rank (most are collectives)."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        keep_last: int = 3,
        every_steps: int = 0,
        every_minutes: float = 0.0,
        async_save: bool = False,
        mirror: str | None = None,
        folder: str | Path | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.folder = Path(folder) if folder is not None else self.run_dir / "checkpoints"
        self.keep_last, self.every_steps, self.every_minutes = keep_last, every_steps, every_minutes
        self.writer = BackgroundWriter() if async_save else None
        self.buffers = HostBuffers() if async_save else None  # kept between async saves
        self.mirror = Mirror(mirror) if mirror else None
        self.engine = None
        self.lock: RunLock | None = None
        self.resumed_from: Path | None = None
        self.universal = False
        self.saved_step: int | None = None
        self.last_blocked_seconds = 0.0  # how long the step loop waited for the last save
        self.last_copy_seconds = 0.0  # of which the copy to host memory
        self.last_bytes_read = 0  # checkpoint bytes this rank read from the file system at resume
        self._last_save = time.monotonic()

    # -- the run folder ------------------------------------------------------------------
    def take_folder(self) -> None:
        """Rank 0 locks the run folder; every rank learns whether it could."""
        error = None
        if files.rank() == 0:
            try:
                self.lock = RunLock(self.run_dir).acquire()
            except (CheckpointError, RuntimeError, OSError) as err:
                error = str(err)
        error = gather_objects(error)[0]
        if error:
            raise RunFolderError(error)

    def record_run(self, config_text: str, extra: dict[str, str]) -> None:
        """Rank 0: ``config.yaml`` (an earlier one kept when a resume changed it) and the
        other resolved configs (name -> text), once a resume has been accepted."""
        if files.rank() != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        start = files.read_meta(self.resumed_from)["step"] if self.resumed_from else 0
        record_config(self.run_dir / "config.yaml", config_text, start)
        for name, text in extra.items():
            (self.run_dir / name).write_text(text)

    def note(self) -> str:
        """What a run that stops on an error leaves behind, for its message (after the
        save in flight, if any, completed or failed)."""
        try:
            self.wait()
        except CheckpointError as err:
            log.error("%s", err)
        latest = read_latest(self.folder)
        if latest:
            return f"the last checkpoint ({self.folder / latest}) is untouched"
        return f"no checkpoint was written yet (train.save_every={self.every_steps})"

    def close(self) -> None:
        """Wait for a save in flight and its upload to the mirror, then free the run folder."""
        try:
            self.wait()
            if self.mirror is not None:
                self.mirror.wait()
        finally:
            if self.lock is not None:
                self.lock.release()
                self.lock = None

    # -- resume ------------------------------------------------------------------------
    def choose(self, which: str, ds_config: dict, world_size: int, universal: bool = False) -> Path | None:
        """Before ``deepspeed.initialize``: the verified checkpoint to resume (None: a fresh
        run); sets DeepSpeed's universal load flag when it needs one. A mirror fills an
        empty local folder first (a new cluster, a lost scratch disk)."""
        if self.mirror is not None and which in ("auto", "latest"):
            self.mirror.restore_if_missing(self.folder)
        self.universal = universal
        self.resumed_from = prepare_resume(ds_config, self.folder, which, world_size, universal)
        return self.resumed_from

    def attach(self, engine) -> None:
        self.engine = engine

    def resume(self) -> dict | None:
        """Load the chosen checkpoint into the engine; its client state (with this rank's
        ``rank_state``), or None for a fresh run. Metric rows logged after the resumed step
        move aside (``run_folder.supersede_rows``)."""
        if self.resumed_from is None:
            if files.rank() == 0:
                supersede_rows(self.run_dir, 0)  # a fresh start: rows of an attempt that saved nothing
            return None
        client, self.last_bytes_read = resume_engine(self.engine, self.resumed_from, self.universal)
        self.saved_step = client["step"]
        if files.rank() == 0:
            supersede_rows(self.run_dir, client["step"])
            log.info(
                "resumed from %s at step %d (rank 0 read %.1f MB of it)",
                self.resumed_from,
                client["step"],
                self.last_bytes_read / 1e6,
            )
        return client

    # -- save ----------------------------------------------------------------------------
    def minutes_due(self) -> bool:
        """This rank's clock says a time-based save is due (rank 0 decides for all: the
        caller shares the flag in a reduction it makes anyway)."""
        return bool(self.every_minutes) and time.monotonic() - self._last_save >= 60 * self.every_minutes

    def due(self, step: int, minutes_due: bool = False) -> bool:
        return bool(self.every_steps and step % self.every_steps == 0) or minutes_due

    def save(self, step: int, client_state: dict, rank_state: dict | None = None, meta: dict | None = None) -> None:
        """A checkpoint of ``step`` (once: a stop signal on a save step does not save again).
        The step loop waits for the copy to host memory; with ``async_save`` the writing,
        hashing and commit run in the background (one save in flight)."""
        if self.saved_step == step:
            return
        start = time.perf_counter()
        if self.writer is not None:
            self.writer.wait()  # one save in flight: the previous one completes first
        tmp = self._prepare(step)
        staged = engine_io.stage(self.engine, tmp, step, client_state, rank_state, self.buffers or HostBuffers())
        self.last_copy_seconds = staged.seconds
        record = {
            "step": step,
            "world_size": self.engine.dp_world_size,
            "zero_stage": self.engine.zero_optimization_stage(),
            "config_fingerprint": client_state.get("config_fingerprint"),
            **(meta or {}),
        }
        if self.writer is None:
            self._write(staged, record, group=None)
            files.barrier()  # nobody reads `latest` or the pruned folders while rank 0 is at work
        else:
            self.writer.start(lambda group: self._write(staged, record, group))
        self.saved_step, self._last_save = step, time.monotonic()
        self.last_blocked_seconds = time.perf_counter() - start

    def _prepare(self, step: int) -> Path:
        error = None
        if files.rank() == 0:
            try:
                files.prepare_tmp(self.folder, tag_for(step))
            except CheckpointError as err:
                error = str(err)
        error = gather_objects(error)[0]  # every rank stops alike on an unwritable folder
        if error:
            raise CheckpointError(error)
        return files.tmp_folder(self.folder, tag_for(step))

    def _write(self, staged, record: dict, group) -> None:
        engine_io.write_and_commit(staged, record, self.keep_last, group)
        if self.mirror is not None and files.rank() == 0:  # uploads in a thread of its own
            self.mirror.push_later(self.folder / tag_for(record["step"]))

    def wait(self) -> None:
        """Block until a save in flight is complete (a stop, the end, an export)."""
        if self.writer is not None:
            self.writer.wait()


def resume_engine(engine, tag_dir: Path, universal: bool = False) -> tuple[dict, int]:
    """Load ``tag_dir`` (verified already) into ``engine``: model, optimizer, scheduler,
    RNG; the client state with ``rank_state`` (this rank's own, None after a world-size
    change), and the bytes this rank read. Through DeepSpeed's universal checkpoint when
    the engine was set up for it."""
    meta = check_world_size(tag_dir, engine.dp_world_size, universal)
    same_world = meta["world_size"] == engine.dp_world_size
    universal_tag = None
    if engine.load_universal_checkpoint():
        universal_tag = to_universal(tag_dir).name
    elif not same_world and meta.get("zero_stage", 0) != 0:
        raise CheckpointError(
            "a universal resume needs the DeepSpeed config flag checkpoint.load_universal=true "
            "before deepspeed.initialize (Checkpointer.choose sets it)"
        )
    return engine_io.load(engine, tag_dir, same_world, universal_tag)


def resume(engine, save_dir: str | Path, which: str = "auto", universal: bool = False) -> dict | None:
    """Find, verify and load a checkpoint of ``save_dir`` without a run folder (tests,
    tools); None when nothing was saved."""
    tag_dir = find_checkpoint(save_dir, which, keep_reads=True)
    return None if tag_dir is None else resume_engine(engine, tag_dir, universal)[0]


def save_checkpoint(
    engine,
    save_dir: str | Path,
    step: int,
    client_state: dict,
    keep_last: int,
    rank_state: dict | None = None,
    meta: dict | None = None,
) -> Path:
    """A synchronous save into ``save_dir`` without a run folder (tests, tools); the tag folder."""
    checkpointer = Checkpointer(Path(save_dir).parent, folder=save_dir, keep_last=keep_last)
    checkpointer.attach(engine)
    checkpointer.save(step, client_state, rank_state, meta)
    return Path(save_dir) / tag_for(step)
