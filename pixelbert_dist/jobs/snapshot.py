"""The code a job runs: the package, launch/, deepspeed_configs/ and the run's config files
copied into ``<output-dir>/code/`` at submission. The job imports from there, so editing
the repository while a job waits in the queue changes nothing."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from pixelbert_dist.jobs.options import SubmitError
from pixelbert_dist.metrics import git_commit

REPO = Path(__file__).resolve().parents[2]
CODE_DIRS = ("pixelbert_dist", "launch", "deepspeed_configs")


def snapshot_code(dest: Path, files: list[str], repo: Path = REPO) -> dict[str, str]:
    """Copy the code and ``files`` into ``dest``; map each file to its absolute copy."""
    if dest.exists():
        raise SubmitError(
            f"{dest} already exists: a queued job may be running from it. "
            f"Choose a new --output-dir (resuming goes by run_dir=, not by this folder)"
        )
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in CODE_DIRS:
        if (repo / name).is_dir():
            shutil.copytree(repo / name, dest / name, ignore=ignore)
    copies = {}
    for index, name in enumerate(files):
        src = Path(name).resolve()
        try:
            target = dest / src.relative_to(repo.resolve())
        except ValueError:  # outside the repository: keep it apart, numbered
            target = dest / "configs" / f"{index}_{src.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
        copies[name] = str(target)
    (dest / "SNAPSHOT.json").write_text(
        json.dumps(
            {
                "source": str(repo),
                "commit": git_commit(repo),
                "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                "files": copies,
            },
            indent=2,
        )
        + "\n"
    )
    return copies
