"""Where checkpoints live in a checkpoint folder, and which ones are kept.

``step_XXXXXXXX/`` per saved step (sorted by name = by step), ``latest`` naming the tag
to resume from, and retention: keep the newest N, never the one ``latest`` names.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from pixelbert_dist.checkpoint.universal import UNIVERSAL_SUFFIX

TAG_RE = re.compile(r"^step_(\d{8})$")
LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def list_tags(save_dir: str | Path) -> list[str]:
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    return sorted(p.name for p in save_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name))


def read_latest(save_dir: str | Path) -> str | None:
    path = Path(save_dir) / LATEST
    return path.read_text().strip() if path.is_file() else None


def prune(save_dir: Path, keep_last: int, protect: str) -> list[str]:
    """Delete all but the newest ``keep_last`` tags (and their universal conversions),
    never ``protect``; ``keep_last`` <= 0 keeps everything. Returns the deleted tags."""
    if keep_last <= 0:
        return []
    tags = list_tags(save_dir)
    doomed = [t for t in tags[:-keep_last] if t != protect]
    for tag in doomed:
        shutil.rmtree(save_dir / tag, ignore_errors=True)
        shutil.rmtree(save_dir / f"{tag}{UNIVERSAL_SUFFIX}", ignore_errors=True)
    return doomed
