"""Shared fixtures: one gloo process group per test session, run folders under tmp_path.

The group is created once and never destroyed: DeepSpeed keeps references to the
groups it made, and a re-init after a destroy in the same process breaks it.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # Share DeepSpeed's compiled shared-memory op between runs (it takes ~30 s to build).
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(_REPO / ".cache" / "torch_extensions"))


@pytest.fixture(scope="session")
def dist_env():
    """A single-process gloo group (rank 0 of 1) that DeepSpeed engines can use."""
    from pixelbert_dist.distributed.env import DistEnv, free_port, init_distributed

    env = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1,
                  master_addr="127.0.0.1", master_port=free_port(), launcher="single")
    return init_distributed(env)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A fresh run folder under pytest's tmp_path (never in the repository)."""
    path = tmp_path / "run"
    path.mkdir()
    return path
