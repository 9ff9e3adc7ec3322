"""Shared fixtures: one gloo process group per test session, run folders under tmp_path.

The group is created once and never destroyed: DeepSpeed keeps references to the
groups it made, and a re-init after a destroy in the same process breaks it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parents[1]
# the shared helpers' assertions report their values as the tests' own do
pytest.register_assert_rewrite("tests.stream_helpers")


def pytest_configure(config):
    # Share DeepSpeed's compiled shared-memory op between runs (it takes ~30 s to build).
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(_REPO / ".cache" / "torch_extensions"))


@pytest.fixture(scope="session")
def dist_env():
    """A single-process gloo group (rank 0 of 1) that DeepSpeed engines can use."""
    from pixelbert_dist.distributed.env import DistEnv, free_port, init_distributed

    env = DistEnv(
        rank=0,
        local_rank=0,
        world_size=1,
        local_world_size=1,
        master_addr="127.0.0.1",
        master_port=free_port(),
        launcher="single",
    )
    return init_distributed(env)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A fresh run folder under pytest's tmp_path (never in the repository)."""
    path = tmp_path / "run"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> dict:
    """The synthetic pre-training set most trainer tests share: train and val splits, 48
    images, 16 per shard (built once per session; nothing writes into it). A module that
    needs another set defines its own ``shards``."""
    from tests.fixtures_data import make_synthetic_shards

    return make_synthetic_shards(tmp_path_factory.mktemp("shards"), num=48, samples_per_shard=16)


@pytest.fixture(scope="session")
def cli_shards(tmp_path_factory) -> Path:
    """72 synthetic samples made by the ``make_shards.py synthetic`` command, as a user
    makes them (train/ and val/ inside), for the job tests (local submitit and Slurm)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("cli_shards")
    subprocess.run(
        [sys.executable, str(_REPO / "launch" / "make_shards.py"), "synthetic", "--out", str(out), "--num", "72"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


@pytest.fixture(scope="session")
def ft(tmp_path_factory) -> dict:
    """Fine-tuning: shards, the synthetic tasks made from them, and a tiny export (the tiny
    preset as the pre-training export writes it: config.json, safetensors, tokenizer files)."""
    import torch

    from pixelbert_dist.data.text import load_tokenizer
    from pixelbert_dist.finetune.synthetic_tasks import SyntheticTasksConfig, generate_tasks
    from pixelbert_dist.model import build_model
    from tests.fixtures_data import make_synthetic_shards

    root = tmp_path_factory.mktemp("ft")
    shards = make_synthetic_shards(root / "shards", num=60, samples_per_shard=30, val_fraction=0.25)
    tasks = root / "tasks"
    summary = generate_tasks([shards["train"], shards["val"]], tasks, SyntheticTasksConfig(seed=1))
    torch.manual_seed(0)
    export = build_model("tiny").save_pretrained(root / "export", load_tokenizer())
    return {
        "shards": [str(shards["train"]), str(shards["val"])],
        "tasks": tasks,
        "export": export,
        "summary": summary,
        "root": root,
    }
