"""A first CPU run says it is compiling DeepSpeed's shared-memory op before the silent
minute of the build, and a run that finds the op built says nothing of it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import deepspeed
import pytest
import torch

from pixelbert_dist.distributed.env import free_port
from pixelbert_dist.distributed.op_build import pending_shm_op_build
from tests.pretrain_helpers import launch_env

REPO = Path(__file__).resolve().parents[1]
NOTICE = "building DeepSpeed's shared-memory op (first run"
ONE_RANK = (
    "from pixelbert_dist.console import setup_console\n"
    "from pixelbert_dist.distributed.env import init_distributed\n"
    "setup_console()\n"
    "init_distributed()\n"
)


def test_a_folder_without_the_op_is_a_pending_build(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert pending_shm_op_build() == tmp_path / "deepspeed_shm_comm"


def _one_rank(extensions: Path) -> str:
    env = launch_env()
    env.update(
        TORCH_EXTENSIONS_DIR=str(extensions),
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        PYTHONUNBUFFERED="1",  # DeepSpeed's print and our log line in the order they happened
    )
    proc = subprocess.run(
        [sys.executable, "-c", ONE_RANK],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
        cwd=REPO,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    return proc.stdout


def test_a_build_for_another_venv_path_or_half_done_is_pending(tmp_path, monkeypatch):
    """ninja compiles again when the command changes: a build.ninja that names another
    venv's deepspeed and torch (a symlinked .venv, another checkout) is no build for this
    one; nor is a library older than its build.ninja (a build stopped half-way)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = tmp_path / "deepspeed_shm_comm"
    folder.mkdir()
    here = Path(deepspeed.__file__).parent
    sources = [here / "ops" / "csrc" / "cpu" / "comm" / name for name in ("shm_interface.cpp", "shm.cpp")]
    torch_include = Path(torch.__file__).parent / "include"
    ninja, library = folder / "build.ninja", folder / "deepspeed_shm_comm.so"
    ninja.write_text(f"cflags = -isystem {torch_include}\n" + "".join(f"build x.o: compile {s}\n" for s in sources))
    library.write_bytes(b"")
    os.utime(ninja, (1000, 1000))  # the library built after the command was written
    assert pending_shm_op_build() is None
    os.utime(library, (500, 500))  # a library from before this command: a half-way build
    assert pending_shm_op_build() == folder
    os.utime(library, (2000, 2000))
    ninja.write_text(ninja.read_text().replace(str(here), "/elsewhere/.venv/site-packages/deepspeed"))
    os.utime(ninja, (1000, 1000))
    assert pending_shm_op_build() == folder


@pytest.mark.slow
def test_the_first_op_build_is_announced_before_it_starts(tmp_path):
    first = _one_rank(tmp_path)  # an empty extensions folder: DeepSpeed compiles the op (~1 min)
    assert NOTICE in first
    assert first.index(NOTICE) < first.index("deepspeed_shm_comm_op built successfully")
    assert (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").is_file()
    second = _one_rank(tmp_path)  # built: no notice
    assert NOTICE not in second
