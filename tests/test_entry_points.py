"""The commands users type: every `launch/*.py` shim and every `pixelbert-*` console script
answers --help (exit 0) without importing torch, so help is instant on a login node."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from tests.pretrain_helpers import launch_env

REPO = Path(__file__).resolve().parents[1]
SHIMS = ["pretrain", "finetune_vqa", "finetune_nlvr2", "finetune_retrieval", "make_shards", "submit", "plot"]
HEAVY = ["export"]  # reads checkpoints: torch at import is fine there
NO_TORCH = (
    "import sys, runpy; sys.argv = [{script!r}, '--help']\n"
    "try:\n    runpy.run_path({script!r}, run_name='__main__')\n"
    "except SystemExit as stop:\n    assert stop.code in (0, None), stop.code\n"
    "assert 'torch' not in sys.modules, 'torch imported before --help'\n"
)


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIMS)
def test_launch_help_is_instant(name):
    script = str(REPO / "launch" / f"{name}.py")
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH.format(script=script)], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", HEAVY)
def test_launch_help_answers(name):
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / f"{name}.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


def test_console_scripts_point_at_callables():
    scripts = {ep.name: ep for ep in entry_points(group="console_scripts") if ep.name.startswith("pixelbert-")}
    assert set(scripts) >= {
        "pixelbert-pretrain",
        "pixelbert-submit",
        "pixelbert-make-shards",
        "pixelbert-plot",
        "pixelbert-finetune-vqa",
        "pixelbert-finetune-nlvr2",
        "pixelbert-finetune-retrieval",
        "pixelbert-export",
    }
    for ep in scripts.values():
        assert callable(ep.load()), ep.value


PRETRAIN = ["launch/pretrain.py", "--deepspeed_config", "zero2.json", "model.preset=tiny"]


@pytest.mark.parametrize(
    "cmd, named",
    [
        ([*PRETRAIN, "train.compile=abc"], "train.compile"),
        (["launch/finetune_vqa.py", "train.compile=abc"], "train.compile"),
        ([*PRETRAIN, "data.train_shards=/no/such/shards"], "/no/such/shards"),  # the data layer's refusals
        (
            [*PRETRAIN, "data.epoch_samples=64", "data.train_shards=unknownproto://b/x-{0..3}.tar"],
            "unknown protocol",
        ),
    ],
)
@pytest.mark.slow
def test_a_refused_run_is_one_line_not_a_traceback(cmd, named, tmp_path):
    cmd = [*cmd, f"run_dir={tmp_path / 'run'}"] if cmd[0] == "launch/pretrain.py" else cmd
    proc = subprocess.run(
        [sys.executable, *cmd], capture_output=True, text=True, timeout=300, cwd=REPO, env=launch_env()
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert named in proc.stderr.strip().splitlines()[-1]
