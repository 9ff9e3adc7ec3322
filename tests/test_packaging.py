"""The package as a user installs it: a wheel built from this checkout, installed with
pip into a fresh venv that already has torch and the other requirements (the project
venv's site-packages, reached through a .pth file: nothing downloaded), and its console
scripts run from there, importing the installed copy, not this checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ["setup.py", "pyproject.toml", "README.md", "LICENSE", "pixelbert_dist", "deepspeed_configs"]


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # no checkout on the path
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, env=env, **kw)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def build_wheel(tmp_path: Path) -> Path:
    """``pip wheel .`` over a copy of the sources (a build in the checkout would leave a
    pixelbert_dist.egg-info there, a second distribution of the name on the test's path)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q"]
    _run([*pip_wheel, "-w", tmp_path / "dist"], cwd=src)
    (wheel,) = (tmp_path / "dist").glob("pixelbert_dist-*.whl")
    return wheel


def fresh_venv_with_torch(path: Path) -> Path:
    """A new venv whose site-packages reaches this venv's (torch, deepspeed, ...) through a
    .pth line: the user's own torch, CPU or CUDA, stays what it is."""
    _run([sys.executable, "-m", "venv", "--without-pip", path])
    python = path / "bin" / "python"
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    Path(site, "project_requirements.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_its_commands_run(tmp_path):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "pixelbert_dist/assets/vocab_synthetic/vocab.txt" in names
    assert "pixelbert_dist/deepspeed_configs/zero2.json" in names
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert {"Provides-Extra: dali", "Provides-Extra: dali-cuda12", "Provides-Extra: dali-cuda13"} <= set(
        metadata.splitlines()
    )
    python = fresh_venv_with_torch(tmp_path / "venv")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel])
    installed = _run([python, "-c", "import pixelbert_dist; print(pixelbert_dist.__file__)"], cwd=tmp_path).stdout
    assert installed.startswith(str(tmp_path / "venv")), installed
    # every requirement the wheel declares resolves in that venv (none left to download)
    missing = _run(
        [
            python,
            "-c",
            "from importlib.metadata import requires, version\n"
            "from packaging.requirements import Requirement\n"
            "reqs = [Requirement(r) for r in requires('pixelbert_dist')]\n"
            "missing = []\n"
            "for r in reqs:\n"
            "    if r.marker is None:\n"
            "        try:\n            version(r.name)\n"
            "        except Exception:\n            missing.append(r.name)\n"
            "print(missing)",
        ],
        cwd=tmp_path,
    ).stdout.strip()
    assert missing == "[]"
    help_text = _run([tmp_path / "venv" / "bin" / "pixelbert-pretrain", "--help"], cwd=tmp_path).stdout
    assert "usage: pixelbert-pretrain" in help_text
    presets = _run([tmp_path / "venv" / "bin" / "pixelbert-pretrain", "--list-presets"], cwd=tmp_path).stdout
    assert "pixelbert-r50" in presets
    # a shipped DeepSpeed config by its bare name, found inside the installed package
    resolve = "from pixelbert_dist.distributed.ds_config import resolve_deepspeed_path as r; print(r('zero2.json'))"
    printed = _run([python, "-c", resolve], cwd=tmp_path).stdout.strip()
    assert printed == str(Path(installed).parent / "deepspeed_configs" / "zero2.json")
