"""A job whose trainer died after making progress requeues itself, a bounded number of times.

At 64 nodes a hang, a crashed rank or a lost node is routine (one every few days); each
should cost minutes, not the night until someone resubmits. The rule, applied by the task
whose trainer exited non-zero:

* the run made progress since this attempt started (``latest`` names a newer checkpoint)
  and the submission has restarts left (``--max-restarts``): requeue the job
  (``scontrol requeue``, as submitit does on a time-out) with ``train.resume=auto``;
* no progress (a crash before the first checkpoint, a rendezvous that failed), a refused
  config (the trainer's exit code 2) or no restarts left: the job fails, as before.

Several ranks may fail at once (``srun --kill-on-bad-exit`` ends the others): the first to
create the attempt's marker file in the submitit folder requeues and writes the line to
``restarts.log`` in the run folder; the others only exit.
"""

from __future__ import annotations

import datetime
import os
import signal
from pathlib import Path

import submitit

from pixelbert_dist.distributed.watchdog import HANG_EXIT_CODE

REFUSED_EXIT_CODE = 2  # the trainer's command line refused the run (train.run.refusals_as_one_line)


def exit_cause(rc: int) -> str:
    """What a trainer's exit code says about how it ended."""
    if rc == HANG_EXIT_CODE:
        return f"hang watchdog fired (exit {rc}: no progress within train.hang_timeout_s; stacks in the task log)"
    if rc < 0:
        return f"killed by {signal.Signals(-rc).name}" if -rc in signal.valid_signals() else f"killed by signal {-rc}"
    if rc == REFUSED_EXIT_CODE:
        return f"refused the run (exit {rc}: a config, run folder or checkpoint problem, stated in the task log)"
    return f"exit code {rc} (a crashed rank or a collective that timed out; the error is in the task log)"


def no_restart_reason(rc: int, progressed: bool, restarts: int, max_restarts: int, on_slurm: bool) -> str | None:
    """Why this failure must not requeue the job, or None when it should."""
    if rc == REFUSED_EXIT_CODE:
        return "a refused run fails the same way again"
    if not progressed:
        return "no checkpoint was written since this attempt started, so another would spend its time the same way"
    if restarts >= max_restarts:
        return f"the job restarted {restarts} time(s) after failures already (--max-restarts {max_restarts})"
    if not on_slurm:
        return "not a Slurm job (rerun the same command: it resumes from the latest checkpoint)"
    return None


def claim_restart(folder: Path, job_id: str, attempt: int) -> bool:
    """True for the first task of this attempt to ask (an O_EXCL file in the submitit folder)."""
    try:
        os.close(os.open(folder / f"{job_id}_restart_{attempt}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def log_restart(run_dir: str | None, line: str) -> None:
    """One line per restart in the run folder's ``restarts.log`` (beside metrics.jsonl)."""
    print(line, flush=True)
    if run_dir:
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        with open(Path(run_dir) / "restarts.log", "a") as f:
            f.write(f"{stamp} {line}\n")


def requeue(successor) -> None:
    """Hand submitit ``successor`` for the requeued job (the job folder's pickle, as its
    time-out handler does) and requeue this job."""
    env = submitit.JobEnvironment()
    paths = env.paths
    current = submitit.helpers.DelayedSubmission.load(paths.submitted_pickle)
    delayed = submitit.helpers.DelayedSubmission(successor)
    delayed.set_timeout(current._timeout_min, current._timeout_countdown)
    with submitit.core.utils.temporary_save_path(paths.submitted_pickle) as tmp:
        delayed.dump(tmp)
    env._requeue(current._timeout_countdown)
