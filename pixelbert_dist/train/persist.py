"""The run's record on disk, for ``BaseTrainer``: the run-folder lock, the resolved
configs, resume (which checkpoint, the re-run rule, each rank's loader position, changed
optimiser settings) and the save of a step. The rules themselves live in ``resume.py``,
``run_dir.py`` and ``pixelbert_dist.checkpoint``; this is where the trainer applies them.
"""

from __future__ import annotations

import logging

from pixelbert_dist import checkpoint as ckpt
from pixelbert_dist.collectives import gather_objects
from pixelbert_dist.config import dump_config, to_dict
from pixelbert_dist.distributed.ds_config import write_deepspeed_config
from pixelbert_dist.train import resume as resume_rule
from pixelbert_dist.train.run_dir import RunFolderError, RunLock, record_config, supersede_rows
from pixelbert_dist.train.schedule import apply_settings, group_settings

log = logging.getLogger("pixelbert_dist.train.loop")


class RunPersistence:
    """Mixed into ``BaseTrainer``: uses its ``cfg``, ``engine``, ``optimizer``, ``scheduler``,
    ``train_loader``, ``state``, ``run_dir``, ``ckpt_dir``, ``resume_dir`` and hooks
    ``check_resumed`` / ``client_state``."""

    def _record_run(self) -> None:
        """The resolved configs into the run folder, once a resume has been accepted (a
        refused one leaves the record as it was)."""
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            start = ckpt.read_meta(self.resume_dir)["step"] if self.resume_dir else 0
            record_config(self.run_dir / "config.yaml", dump_config(self.cfg), start)
            write_deepspeed_config(self.ds_config, self.run_dir / "deepspeed_config.json")

    # -- the run folder, resume and save (see train/run_dir.py and train/resume.py) -----
    def _take_run_folder(self) -> None:
        """Rank 0 locks the run folder; every rank learns whether it could."""
        error = None
        if self.is_main:
            try:
                self.run_lock = RunLock(self.run_dir).acquire()
            except (resume_rule.CheckpointError, RuntimeError, OSError) as err:
                error = str(err)
        error = gather_objects(error)[0]
        if error:
            raise RunFolderError(error)

    def _release_run(self) -> None:
        if getattr(self, "run_lock", None) is not None:
            self.run_lock.release()
            self.run_lock = None

    def _resume(self) -> None:
        t = self.cfg.train
        settings = group_settings(self.optimizer)  # the config's rates, before the checkpoint's replace them
        client = (
            None
            if self.resume_dir is None
            else ckpt.resume(self.engine, self.ckpt_dir, str(self.resume_dir), t.resume_universal, verify=False)
        )
        if client is None:
            if self.is_main:
                supersede_rows(self.run_dir, 0)  # a fresh start: rows of an attempt that saved nothing
            return
        self.check_resumed(client)
        self.state.update(client["trainer"])  # older checkpoints lack newer counters
        self._resume_data(client)
        if self.train_loader.batches_done >= len(self.train_loader):
            self.state["epoch"] += 1  # saved on an epoch's last batch: the next epoch is due, not a replay
        changed = apply_settings(self.optimizer, self.scheduler, settings)
        self._saved_step = self.state["step"]
        if self.is_main:
            supersede_rows(self.run_dir, self.state["step"])
            log.info("resumed from %s at step %d", self.resume_dir, self.state["step"])
            if changed:
                log.warning(
                    "optimiser settings of this config applied from step %d on: %s",
                    self.state["step"],
                    "; ".join(changed),
                )

    def _resume_data(self, client: dict) -> None:
        """This rank's own saved loader position (a streamed one differs per rank: a skipped
        damaged sample shifts that rank's cursors); rank 0's, re-planned, after a world-size
        change or from a checkpoint that kept only rank 0's. A loader that cannot continue
        from it is a refused resume (one line naming what changed), not a traceback."""
        state = (client.get("rank_state") or {}).get("data")
        if state is None:
            state = resume_rule.replan_data_state(client["data"], self.train_loader.state_dict())
        try:
            self.train_loader.load_state_dict(state)
        except ValueError as err:
            raise ckpt.CheckpointError(f"cannot resume {self.resume_dir}: {err}") from None

    def save(self) -> None:
        """A checkpoint of this step, once (a stop signal on a save step does not save again)."""
        if self._saved_step == self.state["step"]:
            return
        config = to_dict(self.cfg)
        client = {
            "trainer": self.state,
            "data": self.train_loader.state_dict(),
            "config_fingerprint": ckpt.config_fingerprint(config),
            **self.client_state(),
        }
        meta = {"config": config, "final": self.state["step"] >= self.total_steps}
        ckpt.save_checkpoint(
            self.engine,
            self.ckpt_dir,
            self.state["step"],
            client,
            self.cfg.train.keep_last,
            rank_state={"data": client["data"]},
            meta=meta,
        )
        self._saved_step = self.state["step"]

    def checkpoint_note(self) -> str:
        """What a run that stops on an error leaves behind, for its message."""
        latest = ckpt.read_latest(self.ckpt_dir)
        if latest:
            return f"the last checkpoint ({self.ckpt_dir / latest}) is untouched"
        return f"no checkpoint was written yet (train.save_every={self.cfg.train.save_every})"
