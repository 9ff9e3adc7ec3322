"""The run config: dataclass defaults <- YAML <- key=value, with strict keys and numbers."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pixelbert_dist.config import ConfigError, load_config, to_dict
from pixelbert_dist.train.config import RunConfig

REPO = Path(__file__).resolve().parents[1]


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"train": {"micro_batch": 4, "epochs": 2}, "optim": {"lr": "2e-4"}}))
    cfg = load_config(
        RunConfig,
        path,
        ["train.micro_batch=8", "optim.lr=1e-3", "schedule.milestones_epochs=[1,2]", "model.overrides.num_layers=3"],
    )
    assert cfg.train.micro_batch == 8
    assert cfg.train.epochs == 2
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert isinstance(cfg.optim.lr, float)  # YAML 1.1 reads 1e-3 as text
    assert cfg.schedule.milestones_epochs == [1, 2]
    assert cfg.model.overrides == {"num_layers": 3}
    assert load_config(RunConfig, path).optim.lr == pytest.approx(2e-4)


def test_bad_keys_and_values_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key.*train\.micro_bacth"):
        load_config(RunConfig, None, ["train.micro_bacth=3"])
    with pytest.raises(ConfigError, match="'optim.lr': 'fast' is not a number"):
        load_config(RunConfig, None, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(RunConfig, None, ["train.micro_batch"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(RunConfig, tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("train.compile=abc", "train.compile", "expected bool, got 'abc'"),
        ("model.freeze=embeddings", "model.freeze", r"expected list\[str\], got 'embeddings'"),
        ("optim.betas=0.9", "optim.betas", r"expected tuple\[float, float\], got 0.9"),
        ("train.micro_batch=2.5", "train.micro_batch", "expected int, got 2.5"),
    ],
)
def test_values_of_the_wrong_type_are_refused_naming_key_type_and_value(override, key, expected):
    with pytest.raises(ConfigError, match=rf"config key '{re.escape(key)}': {expected}"):
        load_config(RunConfig, None, [override])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.precision=fp8", "train.precision='fp8': must be one of 'fp32', 'bf16', 'fp16' or null"),
        ("schedule.kind=linear", "schedule.kind='linear': must be one of 'step', 'cosine', 'constant'"),
    ],
)
def test_a_value_outside_a_keys_choices_is_refused_listing_them(override, expected):
    with pytest.raises(ConfigError, match=f"^{re.escape(expected)}$"):
        load_config(RunConfig, None, [override])


def test_types_are_checked_in_files_too_and_in_the_finetuning_config(tmp_path):
    from pixelbert_dist.finetune.config import FinetuneConfig

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"train": {"sync_bn": "maybe"}}))
    with pytest.raises(ConfigError, match=r"run\.yaml: config key 'train\.sync_bn': expected bool, got 'maybe'"):
        load_config(RunConfig, path)
    with pytest.raises(ConfigError, match="task='gqa': must be one of 'vqa', 'nlvr2', 'retrieval'"):
        load_config(FinetuneConfig, None, ["task=gqa"])
    cfg = load_config(FinetuneConfig, None, ["train.max_nonfinite_in_row=5", "optim.betas=[0.8, 0.9]"])
    assert cfg.train.max_nonfinite_in_row == 5
    assert cfg.optim.betas == (0.8, 0.9)  # the loop's own keys


def _leaf_keys(tree: dict, where: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        out += _leaf_keys(value, f"{where}{key}.") if isinstance(value, dict) and value else [where + key]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("script, cls", [("pretrain", "RunConfig"), ("finetune_vqa", "FinetuneConfig")])
def test_help_lists_every_key_with_its_default_without_importing_deepspeed(script, cls):
    from pixelbert_dist.finetune.config import FinetuneConfig

    code = (
        "import runpy, sys\n"
        f"sys.argv = ['{script}.py', '--help']\n"
        "try:\n"
        f"    runpy.run_path('launch/{script}.py', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('deepspeed loaded:', 'deepspeed' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    ).stdout
    assert out.rstrip().endswith("deepspeed loaded: False")
    defaults = to_dict({"RunConfig": RunConfig, "FinetuneConfig": FinetuneConfig}[cls]())
    # fine-tuning's help lists the shared keys and the task's own: the command sets `task`,
    # and the other tasks' sections would only mislead
    not_shown = ("task", "nlvr2.", "retrieval.") if script == "finetune_vqa" else ()
    for key in _leaf_keys(defaults):
        if key.startswith(not_shown):
            continue
        value = defaults
        for part in key.split("."):
            value = value[part]
        shown = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        assert re.search(rf"^  {re.escape(key)}={re.escape(shown)} +\(", out, re.M), key
    assert "train.max_nonfinite_in_row=20" in out
    assert "NaN/inf losses are skipped" in out  # the field's comment


def test_print_config_prints_the_merged_config_and_exits(tmp_path, capsys):
    from pixelbert_dist.train import run

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"train": {"micro_batch": 4}}))
    assert run.main(["--print-config", "--config", str(path), "optim.lr=3e-4", "train.compile=true"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    merged = load_config(RunConfig, path, ["optim.lr=3e-4", "train.compile=true"])
    assert printed == yaml.safe_load(yaml.safe_dump(to_dict(merged)))  # (YAML has lists, no tuples)
    assert printed["train"]["micro_batch"] == 4
    assert printed["optim"]["lr"] == 3e-4
    assert printed["train"]["compile"]
    with pytest.raises(ConfigError, match="config key 'train.compile'"):
        run.main(["--print-config", "train.compile=abc"])


def test_list_presets_names_every_registered_preset(capsys):
    from pixelbert_dist.model import list_presets
    from pixelbert_dist.train import run

    assert run.main(["--list-presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list_presets()
    assert "resnext152_32x8d" in next(line for line in lines if line.startswith("pixelbert-x152"))
