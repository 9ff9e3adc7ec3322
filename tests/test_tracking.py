"""train.report_to and train.profile_steps on a real (tiny) training: W&B's offline run,
read back with W&B's own reader (`wandb leet inspect --json`), holds the config and every
row of metrics.jsonl, as TensorBoard does; a resumed run continues the same W&B run; the
profiler's trace holds the asked steps; the export's model card the final metrics."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pixelbert_dist.config import ConfigError, load_config
from pixelbert_dist.metrics import read_jsonl
from pixelbert_dist.tracking import WANDB_ID_FILE
from pixelbert_dist.train.config import RunConfig
from tests.pretrain_helpers import fast_overrides


def inspect(run_file, *flags) -> str:
    """An offline run's .wandb file through W&B's own reader, as JSON."""
    command = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", *flags, str(run_file)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


def wandb_records(run_file) -> list[dict]:
    """Every record of the file, in the order written."""
    return [json.loads(line) for line in inspect(run_file).splitlines() if line.startswith("{")]


def wandb_rows(records: list[dict]) -> list[dict]:
    """The logged rows, without W&B's own bookkeeping keys."""
    rows = [r["history"]["item"] for r in records if r["type"] == "history"]
    return [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]


def as_wandb_rows(rows: list[dict]) -> list[dict]:
    """metrics.jsonl rows as the W&B writer logs them: ``step`` and ``split/key``."""
    return [
        {"step": r["step"], **{f"{r['split']}/{k}": v for k, v in r.items() if k not in ("step", "split", "time")}}
        for r in rows
    ]


def offline_run_files(wandb_dir) -> list:
    return sorted((wandb_dir / "wandb").glob("offline-run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime)


def train(dist_env, overrides: list[str]):
    from pixelbert_dist.train.trainer import Trainer

    Trainer(load_config(RunConfig, None, overrides), "deepspeed_configs/zero2.json").fit()


@pytest.mark.slow
def test_wandb_offline_tensorboard_and_profile_hold_the_run(dist_env, shards, tmp_path, monkeypatch):
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir, wandb_dir = tmp_path / "run", tmp_path / "wandb_dir"
    base = fast_overrides(run_dir, shards, steps=4) + ["train.report_to=[tensorboard,wandb]", "train.save_every=2"]
    train(dist_env, base + ["train.profile_steps=2-3"])

    # W&B: the run's config and exactly metrics.jsonl's rows, in order
    (first_file,) = offline_run_files(wandb_dir)
    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    assert first_file.name == f"run-{run_id}.wandb"
    records = wandb_records(first_file)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert {r["split"] for r in rows} == {"train", "val"} and len(rows) == 5
    assert wandb_rows(records) == as_wandb_rows(rows)
    config = json.loads(inspect(first_file, "--summary"))["config"]
    config.pop("_wandb", None)
    assert config == yaml.safe_load((run_dir / "config.yaml").read_text())

    # TensorBoard: the same scalars (stored as float32); text labels (a host name) are not scalars
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    for row in rows:
        for key, value in row.items():
            if key not in ("step", "split", "time") and isinstance(value, float):
                scalars = {e.step: e.value for e in events.Scalars(f"{row['split']}/{key}")}
                assert scalars[row["step"]] == pytest.approx(value, rel=1e-6, abs=1e-30), key

    # the export's model card: the steps and the final metrics of metrics.jsonl
    card = (run_dir / "export" / "README.md").read_text()
    val = [r for r in rows if r["split"] == "val"][-1]
    assert "| optimiser steps | 4 |" in card
    assert f"| val | 4 | {val['loss']:.4g} | {val['mlm_loss']:.4g} | {val['itm_loss']:.4g} |" in card

    # the profiler's trace: steps 2 and 3, nothing else
    (trace,) = (run_dir / "profile").glob("rank0.*.pt.trace.json")
    names = {e.get("name", "") for e in json.loads(trace.read_text())["traceEvents"]}
    assert {n for n in names if n.startswith("ProfilerStep#")} == {"ProfilerStep#2", "ProfilerStep#3"}

    # a resume continues the same W&B run with the steps after the checkpoint
    train(dist_env, base + ["train.max_steps=6", "train.resume=latest"])
    assert (run_dir / WANDB_ID_FILE).read_text().strip() == run_id
    first, second = offline_run_files(wandb_dir)
    assert first == first_file and second.name == f"run-{run_id}.wandb"
    resumed = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["step"] > 4]
    assert [r["step"] for r in resumed] == [5, 6, 6]  # train 5, 6, val 6
    assert wandb_rows(wandb_records(second)) == as_wandb_rows(resumed)


def test_report_to_is_a_list_of_known_trackers():
    cfg = load_config(RunConfig, None, ["train.report_to=[wandb, tensorboard]"])
    assert cfg.train.report_to == ["wandb", "tensorboard"]
    assert load_config(RunConfig, None, ["train.report_to=[]"]).train.report_to == []
    with pytest.raises(
        ConfigError, match=r"train.report_to=\['mlflow'\]: must be list\[one of 'tensorboard', 'wandb'\]"
    ):
        load_config(RunConfig, None, ["train.report_to=[mlflow]"])


def test_wandb_without_its_package_is_refused_before_training(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = load_config(RunConfig, None, ["train.report_to=[wandb]", "data.train_shards=x"])
    with pytest.raises(ValueError, match=r"wandb package is not installed: pip install 'pixelbert_dist\[wandb\]'"):
        cfg.validate()


@pytest.mark.parametrize("text", ["5-3", "0-2", "10-", "abc"])
def test_bad_profile_steps_are_refused_naming_the_key(text):
    cfg = load_config(RunConfig, None, [f"train.profile_steps={text}", "data.train_shards=x"])
    with pytest.raises(ValueError, match=r"train.profile_steps=.*expected FIRST-LAST"):
        cfg.validate()


def test_profile_steps_ranges():
    def steps(text):
        return load_config(RunConfig, None, [f"train.profile_steps={text}"]).train.profile_range()

    assert steps("10-15") == (10, 15) and steps("12") == (12, 12) and steps("''") is None


def traced_steps(folder) -> list[set[str]]:
    """The ProfilerStep ranges of every trace in ``folder``, oldest first."""
    out = []
    for trace in sorted(folder.glob("rank0.*.pt.trace.json"), key=lambda p: p.stat().st_mtime):
        names = {e.get("name", "") for e in json.loads(trace.read_text())["traceEvents"]}
        out.append({n for n in names if n.startswith("ProfilerStep#")})
    return out


@pytest.mark.slow
def test_the_profiler_traces_what_is_left_of_its_range(tmp_path):
    """A run resumed inside the range traces the steps it still runs; a run that ends inside
    it writes what it recorded."""
    import torch

    from pixelbert_dist.train.profiling import StepProfiler

    layer = torch.nn.Linear(32, 32)

    def run(first_done: int, last_done: int, steps: tuple[int, int], run_dir) -> None:
        profiler = StepProfiler(steps, run_dir, 0, torch.device("cpu"), total=last_done)
        profiler.after_step(first_done)  # fit's call before the first step
        for done in range(first_done + 1, last_done + 1):
            layer(torch.randn(8, 32)).sum().backward()
            profiler.after_step(done)
        profiler.close()

    run(4, 8, (3, 6), tmp_path / "resumed")  # resumed at step 4: steps 5 and 6 are left
    assert traced_steps(tmp_path / "resumed" / "profile") == [{"ProfilerStep#5", "ProfilerStep#6"}]
    run(0, 4, (3, 6), tmp_path / "ended")  # the run ends after step 4
    assert traced_steps(tmp_path / "ended" / "profile") == [{"ProfilerStep#3", "ProfilerStep#4"}]
    run(0, 9, (1, 1), tmp_path / "first")  # step 1: no warm-up step before it
    assert traced_steps(tmp_path / "first" / "profile") == [{"ProfilerStep#1"}]
