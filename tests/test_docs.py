"""The README and docs/ as a user reads them: every file a command names exists, every link
between the pages resolves, and the cheap commands run as written (the quick start's shard
build and `--help`, a few steps of the README's pre-training command)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pixelbert_dist.distributed.env import free_port
from tests.pretrain_helpers import launch_env

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"```bash\n(.*?)```", re.S)
FOLDERS = "launch|benchmarks|deepspeed_configs|tests|docs"
REPO_PATH = re.compile(rf"(?<![\w/.])((?:{FOLDERS})/[\w./-]+\.(?:py|sh|json|yaml|md))")
LINK = re.compile(r"\]\(([\w./-]+\.md)(?:#[\w-]+)?\)")


def commands(page: Path) -> list[str]:
    """The page's bash commands, continuation lines joined, comments dropped."""
    found = []
    for block in FENCE.findall(page.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                found.append(line)
    return found


def readme_command(start: str) -> list[str]:
    line = next(c for c in commands(REPO / "README.md") if c.startswith(start))
    return shlex.split(line)


def test_readme_is_a_front_page():
    assert len((REPO / "README.md").read_text().splitlines()) <= 150


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_named_file_and_link_exists(page):
    text = page.read_text()
    missing = [p for p in REPO_PATH.findall(text) if not (REPO / p).exists() and "X." not in p]
    missing += [link for link in LINK.findall(text) if not (page.parent / link).is_file()]
    assert missing == [], f"{page.name} names files that do not exist"


@pytest.fixture
def user_folder(tmp_path):
    """A working folder like a clone's: the repository's command folders, nothing built."""
    for name in ("launch", "deepspeed_configs", "benchmarks"):
        (tmp_path / name).symlink_to(REPO / name)
    return tmp_path


def _run(argv: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    if argv[0].endswith("python"):
        argv = [sys.executable, *argv[1:]]
    proc = subprocess.run(argv, cwd=cwd, env=launch_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{shlex.join(argv)}\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_quick_start_commands_run_as_written(user_folder):
    _run(readme_command(".venv/bin/python launch/make_shards.py synthetic"), user_folder)
    assert (user_folder / "data/synthetic/train/manifest.json").is_file()
    assert "usage:" in _run(readme_command(".venv/bin/python launch/pretrain.py --help"), user_folder).stdout


@pytest.mark.slow
@pytest.mark.launcher
def test_readme_pretraining_command_trains(user_folder):
    _run(readme_command(".venv/bin/python launch/make_shards.py synthetic"), user_folder)
    argv = readme_command(".venv/bin/deepspeed launch/pretrain.py")
    launcher = str(Path(sys.executable).parent / "deepspeed")
    argv = [launcher, "--num_gpus", "1", "--master_port", str(free_port()), *argv[1:], "train.max_steps=3"]
    _run(argv, user_folder)
    rows = (user_folder / "runs/demo_ds/metrics.jsonl").read_text().splitlines()
    assert any('"step": 3' in row for row in rows)
