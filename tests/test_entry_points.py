"""The commands users type: every `launch/*.py` shim and every `pixelbert-*` console script
answers --help (exit 0) without importing torch, DeepSpeed, transformers or matplotlib
(seconds each on a loaded node), so help is instant on a login node; so does every
`python -m benchmarks.X` (DALI too)."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pretrain_helpers import launch_env

CONSOLE_SCRIPTS = {
    "pixelbert-pretrain",
    "pixelbert-submit",
    "pixelbert-make-shards",
    "pixelbert-plot",
    "pixelbert-finetune-vqa",
    "pixelbert-finetune-nlvr2",
    "pixelbert-finetune-retrieval",
    "pixelbert-export",
    "pixelbert-evaluate",
}

REPO = Path(__file__).resolve().parents[1]
SHIMS = ["pretrain", "finetune_vqa", "finetune_nlvr2", "finetune_retrieval", "make_shards", "submit", "plot", "export"]
SHIMS += ["demo", "evaluate"]  # --help must print help, not start the demo
NO_TORCH = (
    "import sys, runpy; sys.argv = [{script!r}, *{args!r}]\n"
    "try:\n    runpy.run_path({script!r}, run_name='__main__')\n"
    "except SystemExit as stop:\n    assert stop.code in (0, None), stop.code\n"
    "heavy = {{'torch', 'deepspeed', 'transformers', 'matplotlib'}} & set(sys.modules)\n"
    "assert not heavy, f'{{heavy}} imported before --help'\n"
)
BENCH_NO_TORCH = (
    "import sys, runpy; sys.argv = [{module!r}, '--help']\n"
    "try:\n    runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
    "except SystemExit as stop:\n    assert stop.code in (0, None), stop.code\n"
    "heavy = {{'torch', 'deepspeed', 'transformers', 'matplotlib', 'nvidia.dali'}} & set(sys.modules)\n"
    "assert not heavy, f'{{heavy}} imported before --help'\n"
)
CONSOLE_NO_TORCH = (
    "import importlib, sys; sys.argv = [{name!r}, '--help']\n"
    "main = getattr(importlib.import_module({module!r}), {func!r})\n"
    "try:\n    sys.exit(main())\n"
    "except SystemExit as stop:\n    assert stop.code in (0, None), stop.code\n"
    "heavy = {{'torch', 'deepspeed', 'transformers', 'matplotlib'}} & set(sys.modules)\n"
    "assert not heavy, f'{{heavy}} imported before --help'\n"
)


def benchmark_entry_points() -> list[str]:
    """Every benchmarks/*.py with a __main__ block: a new benchmark is covered unasked."""
    main_block = re.compile(r"^if __name__ == [\"']__main__[\"']:", re.MULTILINE)
    return sorted(p.stem for p in (REPO / "benchmarks").glob("*.py") if main_block.search(p.read_text()))


def console_scripts_in_setup() -> dict[str, tuple[str, str]]:
    """name -> (module, function), as setup.py declares them (the installed metadata may
    be older than this checkout: the wheel test checks an installed copy)."""
    found = re.findall(r'"(pixelbert-[\w-]+) = ([\w.]+):(\w+)"', (REPO / "setup.py").read_text())
    return {name: (module, func) for name, module, func in found}


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO, env=launch_env()
    )


@pytest.mark.parametrize("name", SHIMS)
def test_launch_help_is_instant(name):
    """No torch imported by the time --help has printed: help answers in about a second."""
    proc = _python(NO_TORCH.format(script=str(REPO / "launch" / f"{name}.py"), args=["--help"]))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


def test_list_presets_imports_no_torch():
    proc = _python(NO_TORCH.format(script=str(REPO / "launch" / "pretrain.py"), args=["--list-presets"]))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pixelbert-r50    resnet50" in proc.stdout
    assert "pixelbert-x152   resnext152_32x8d" in proc.stdout


def test_setup_declares_every_console_script():
    assert set(console_scripts_in_setup()) == CONSOLE_SCRIPTS


@pytest.mark.parametrize("name", sorted(CONSOLE_SCRIPTS))
def test_console_script_help_is_instant(name):
    module, func = console_scripts_in_setup()[name]
    proc = _python(CONSOLE_NO_TORCH.format(name=name, module=module, func=func))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


def test_benchmark_entry_points_are_found():
    assert {"bench_step", "bench_attention", "gpu_decode", "summarize"} <= set(benchmark_entry_points())


@pytest.mark.parametrize("name", benchmark_entry_points())
def test_benchmark_help_is_instant(name):
    """`python -m benchmarks.X --help`: usage, exit 0, no torch/DeepSpeed/DALI imported."""
    proc = _python(BENCH_NO_TORCH.format(module=f"benchmarks.{name}"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


@pytest.mark.parametrize("script", ["benchmarks/gpu_check.sh", "benchmarks/run_all.sh"])
def test_shell_scripts_answer_help(script):
    """--help prints the header's description and exits 0, running nothing."""
    proc = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--out DIR" in proc.stdout
    assert proc.stderr == ""


@pytest.mark.parametrize("task, own", [("vqa", "vqa."), ("nlvr2", "nlvr2."), ("retrieval", "retrieval.")])
def test_finetune_help_shows_the_tasks_keys_only(task, own):
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / f"finetune_{task}.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=launch_env(),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    keys = [line.split("=", 1)[0].strip() for line in proc.stdout.split("help shown:", 1)[1].splitlines()]
    sections = {key.split(".", 1)[0] for key in keys if "." in key}
    assert own.rstrip(".") in sections
    assert sections.isdisjoint({"vqa", "nlvr2", "retrieval"} - {own.rstrip(".")}), sections
    assert "task" not in keys  # the command sets it
    assert "__" not in proc.stdout  # argparse's dest names (VQA__TRAIN_QUESTIONS) stay hidden


def test_console_scripts_point_at_callables():
    """Each console script's target, as this checkout's setup.py names it, is a function."""
    for name, (module, func) in console_scripts_in_setup().items():
        assert callable(getattr(importlib.import_module(module), func)), name


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


def test_demo_ranks_fit_the_gpus():
    """`make demo`: 2 CPU ranks without a GPU, one rank per GPU (at most 2) with them; more
    ranks than GPUs are refused in one line. One rank keeps the global batch (2 micro-batches)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo", REPO / "launch" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert demo.demo_ranks(None, gpus=0) == 2
    assert demo.demo_ranks(None, gpus=1) == 1
    assert demo.demo_ranks(None, gpus=8) == 2
    assert demo.demo_ranks(1, gpus=0) == 1
    with pytest.raises(SystemExit, match=r"^demo: --ranks 2 but this machine has 1 GPU\(s\)"):
        demo.demo_ranks(2, gpus=1)
    with pytest.raises(SystemExit, match="at least 1"):
        demo.demo_ranks(0, gpus=0)
