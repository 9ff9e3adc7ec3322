"""What a resume may do with a run folder, and what it carries over into a changed run.

The rule (also in the README):

* ``train.resume=auto`` (the default) resumes only the same run: the checkpoint's config
  (kept in its meta.json) must equal this one, up to housekeeping keys (``HOUSEKEEPING``:
  logging, saving and the resume keys themselves). A finished run (its last checkpoint is
  the final step) is never resumed nor overwritten. Either case is an error that names the
  differences and says what to pass instead: a new ``run_dir``, or an explicit
  ``train.resume=latest`` (or a tag) to continue the run with the new settings.
* an explicit ``train.resume`` continues from that checkpoint with the new settings,
  listing what changed. Changed learning rates (``optim.lr``, ``optim.cnn_lr``, and the
  other per-group hyper-parameters) are applied from the resumed step on: the schedule's
  factor continues from the saved step, times the new base rates.
* ``train.resume=none`` starts over, and so never in a folder that holds checkpoints.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pixelbert_dist.checkpoint.files import CheckpointError, read_meta
from pixelbert_dist.checkpoint.layout import list_tags
from pixelbert_dist.config import dotted_keys
from pixelbert_dist.data.readers.stream_replan import replan_stream_state

log = logging.getLogger(__name__)
HOUSEKEEPING = frozenset(
    {
        "run_dir",
        "train.resume",
        "train.resume_universal",
        "train.log_every",
        "train.eval_every",
        "train.save_every",
        "train.save_every_minutes",
        "train.async_save",
        "train.checkpoint_mirror",
        "train.keep_last",
        "train.export",
        "train.max_nonfinite_in_row",
        "train.max_loss",
        "data.num_workers",
    }
)


def config_changes(saved: dict, now: dict) -> dict[str, tuple]:
    """key: (saved, now) for every key that differs, housekeeping left out."""
    saved, now = (dotted_keys(json.loads(json.dumps(c, default=str))) for c in (saved, now))
    return {
        k: (saved.get(k), now.get(k))
        for k in sorted(set(saved) | set(now))
        if k not in HOUSEKEEPING and saved.get(k) != now.get(k)
    }


def _listing(changes: dict) -> str:
    shown = [f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(changes.items())[:8]]
    return ", ".join(shown) + (f" and {len(changes) - 8} more" if len(changes) > 8 else "")


def refuse_fresh_over_checkpoints(ckpt_dir: Path) -> None:
    tags = list_tags(ckpt_dir)
    if tags:
        raise CheckpointError(
            f"train.resume=none would start a new run in a folder whose checkpoints "
            f"({ckpt_dir}: {', '.join(tags)}) belong to an earlier run: it would prune them "
            "and mix the two runs' records. Pass a new run_dir (or delete that folder first)."
        )


def check_resumable(tag_dir: Path, which: str, config: dict, total_steps: int) -> dict:
    """Apply the rule of the module docstring to the checkpoint chosen for this run.
    Returns the changed keys (an explicit resume may change settings)."""
    meta = read_meta(tag_dir)
    run_dir = tag_dir.parent.parent
    step, saved = meta["step"], meta.get("config")
    changes = config_changes(saved, config) if saved is not None else {}
    finished = meta.get("final") or step >= total_steps
    if which == "auto" and finished:
        raise CheckpointError(
            f"{run_dir} holds a finished run (step {step}, its final step): a re-run never overwrites it. "
            f"Pass a new run_dir=..., or train.resume=latest with a larger train.max_steps / train.epochs "
            f"to train it further."
        )
    if which == "auto" and changes:
        raise CheckpointError(
            f"{run_dir} holds checkpoints of another config ({_listing(changes)}): train.resume=auto "
            f"resumes the same run only. Pass a new run_dir=..., or train.resume=latest to continue that "
            f"run from step {step} with these settings (changed learning rates apply from there)."
        )
    if step >= total_steps:
        raise CheckpointError(
            f"nothing to train: {tag_dir} is at step {step} and this run has {total_steps} "
            "steps in all; raise train.max_steps or train.epochs"
        )
    if changes:
        log.warning("resuming %s at step %d with a changed config: %s", tag_dir, step, _listing(changes))
    return changes


STREAM_SHAPE = ("world_size", "batch_size", "num_workers")  # a streamed position holds for this shape only


def reshaped(saved: dict, now: dict) -> bool:
    """A streamed loader state of another shape than this loader (``train.resume_universal``
    then re-plans it, also at the same world size: another worker count or batch size)."""
    return "stream_cursors" in saved and any(saved.get(k) != now.get(k) for k in STREAM_SHAPE)


def replan_data_state(saved: dict, now: dict, say: bool = True) -> dict:
    """A loader state saved at another world size or batch size, moved to the same number
    of samples into the epoch for this loader (samples seen = batches x batch x ranks, a
    world-size-independent count); unchanged otherwise. The epoch plan gives rank r the
    slots r, r+W, ... so after b batches every rank together read the first b*B*W slots of
    the epoch's order, whatever W: the new ranks continue from the same slot. A streamed
    position (cursors into each rank's own shard streams) restarts every stream at a shard
    boundary (``readers/stream_replan.py``), said in one line where ``say``."""
    if reshaped(saved, now):
        state, line = replan_stream_state(saved, now)
        if say:
            log.warning("%s", line)
        return state
    keys = ("batches_done", "batch_size", "world_size")
    if not all(k in saved and k in now for k in keys) or (saved["batch_size"], saved["world_size"]) == (
        now["batch_size"],
        now["world_size"],
    ):
        return saved
    if "per_rank" in saved:
        return _replan_blocks(saved, now)
    seen = saved["batches_done"] * saved["batch_size"] * saved["world_size"]
    batches, extra = divmod(seen, now["batch_size"] * now["world_size"])
    log.info(
        "data position re-planned from %d rank(s) x batch %d to %d rank(s) x batch %d: %d samples "
        "into epoch %d -> batch %d",
        saved["world_size"],
        saved["batch_size"],
        now["world_size"],
        now["batch_size"],
        seen,
        saved.get("epoch", 0),
        batches,
    )
    if extra:
        log.warning(
            "the new batch (%d ranks x %d) does not divide the %d samples seen: the next %d are read again",
            now["world_size"],
            now["batch_size"],
            seen,
            extra,
        )
    return {**saved, "batches_done": batches, "batch_size": now["batch_size"], "world_size": now["world_size"]}


def _replan_blocks(saved: dict, now: dict) -> dict:
    """A block plan (each rank reads its own block of the shard-window order) continued at
    another world size over what each earlier rank left of its block: exact, except that
    a bucketed rank re-reads the batches of its unfinished bucketing window."""
    window = saved.get("bucket_window", 1)
    done = min(saved["batches_done"] // window * window * saved["batch_size"], saved["per_rank"])
    again = saved["batches_done"] * saved["batch_size"] - done
    replans = [*saved.get("replans", ()), [saved["world_size"], saved["per_rank"], done]]
    log.info(
        "data position re-planned from %d rank(s) x batch %d to %d rank(s) x batch %d: epoch %d "
        "continues over the %d samples each rank left of its block (%d per rank read again: "
        "the unfinished bucketing window)",
        saved["world_size"],
        saved["batch_size"],
        now["world_size"],
        now["batch_size"],
        saved.get("epoch", 0),
        saved["per_rank"] - done,
        max(again, 0),
    )
    moved = {"batch_size": now["batch_size"], "world_size": now["world_size"], "replans": replans}
    return {**saved, "batches_done": 0, **moved}
