"""Config fields carry their own help, choices and bounds (``Annotated[T, Help(...), Ge(..)]``):
``--help`` is built from them, every key has a help of its own, and a value out of bounds is
refused by key, in one line, before a run folder exists."""

from __future__ import annotations

import collections
import json
import re
import typing

import pytest

from pixelbert_dist.config import ConfigError, config_help, key_docs, load_config
from pixelbert_dist.data.config import DataConfig
from pixelbert_dist.finetune.config import FinetuneConfig
from pixelbert_dist.train.config import RunConfig

ROOTS = {"pretrain": RunConfig, "finetune": FinetuneConfig}
FILE_SUFFIXES = {"json", "jsonl", "yaml", "py", "safetensors", "txt", "tar"}
ZERO2 = "deepspeed_configs/zero2.json"


def helps(root) -> dict[str, str]:
    return {doc.key: doc.help for doc in key_docs(root)}


@pytest.mark.parametrize("root", ROOTS.values(), ids=ROOTS.keys())
def test_every_key_has_a_help_of_its_own(root):
    """A new field must say what it is where it is declared: no help, or another key's
    help, fails here (a default changed in a subclass repeats the whole Annotated)."""
    found = helps(root)
    missing = [key for key, text in found.items() if len(text.split()) < 2]
    assert not missing, f"fields without Help(...) in their Annotated type: {missing}"
    shared = {text: keys for text, keys in _keys_by_help(found).items() if len(keys) > 1}
    assert not shared, f"keys sharing one help text: {shared}"


def _keys_by_help(found: dict[str, str]) -> dict[str, list[str]]:
    out = collections.defaultdict(list)
    for key, text in found.items():
        out[text].append(key)
    return out


@pytest.mark.parametrize("root", ROOTS.values(), ids=ROOTS.keys())
def test_a_help_names_only_keys_that_exist(root):
    """A help that points at another key (``>= data.image_shorter``) names a real one."""
    found = helps(root)
    sections = sorted({key.split(".")[0] for key in found if "." in key})
    for key, text in found.items():
        for named in re.findall(rf"\b(?:{'|'.join(sections)})\.\w+(?:\.\w+)?", text):
            if named.rsplit(".", 1)[1] in FILE_SUFFIXES:  # a file name (train.json), not a key
                continue
            assert named in found or named.startswith("model.overrides."), f"{key}'s help names {named}"


def test_the_helps_the_comment_parser_got_wrong_are_right():
    found = helps(RunConfig)
    assert "prefixes" in found["model.freeze"] and "warm start" not in found["model.freeze"]
    assert "warm start" in found["model.visual_weights"]
    assert "validation" in found["data.val_shards"] and "pipe:" not in found["data.val_shards"]
    assert "pipe:" in found["data.train_shards"]
    assert "'webdataset'" in found["data.dali_reader"] and "DALI, nvjpeg" in found["data.backend"]


@pytest.mark.parametrize("root", ROOTS.values(), ids=ROOTS.keys())
def test_help_lines_show_default_type_choices_bounds_and_help(root):
    lines = config_help(root)
    docs = key_docs(root)
    assert len(lines) == len(docs)
    for line, doc in zip(lines, docs):
        assert line.startswith(f"  {doc.key}=") and line.endswith(f"  {doc.help}"), line
        if typing.get_origin(doc.type) is typing.Literal:
            choices = ", ".join(map(repr, typing.get_args(doc.type)))
            assert f"(one of {choices})" in line, line
    text = "\n".join(lines)
    if root is RunConfig:
        assert re.search(r"^  data\.backend=dali +\(one of 'dali', 'nvjpeg', 'pil'\)  image decoding", text, re.M)
        assert re.search(r"^  train\.save_every=500 +\(int, >= 0\)  optimiser steps between checkpoints", text, re.M)
        assert re.search(r"^  optim\.lr=0\.0001 +\(float, > 0\)", text, re.M)
        assert re.search(r"^  data\.mlm_prob=0\.15 +\(float, in \[0, 1\]\)", text, re.M)
    else:
        assert re.search(r"^  train\.micro_batch=32 +\(int, >= 1\)  .*NLVR2", text, re.M)  # the subclass's own


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.save_every=-5", "train.save_every=-5: must be >= 0"),
        ("optim.lr=-1e-4", "optim.lr=-1e-4: must be > 0"),
        ("optim.cnn_lr=0", "optim.cnn_lr=0: must be > 0"),
        ("train.micro_batch=0", "train.micro_batch=0: must be >= 1"),
        ("train.log_every=0", "train.log_every=0: must be >= 1"),
        ("data.mlm_prob=1.5", "data.mlm_prob=1.5: must be <= 1"),
        ("optim.betas=[0.9,1.0]", r"optim.betas=[0.9, 1.0]: must be < 1"),
        ("schedule.gamma=0", "schedule.gamma=0: must be > 0"),
        ("data.num_workers=-1", "data.num_workers=-1: must be >= 0"),
        ("data.backend=turbo", "data.backend='turbo': must be one of 'dali', 'nvjpeg', 'pil'"),
        ("data.dali_reader=tar", "data.dali_reader='tar': must be one of 'external', 'webdataset'"),
        ("model.overrides.num_layerz=3", "model.overrides.num_layerz: not a field of PixelBertConfig; valid: ["),
        ("model.overrides.num_layers=six", "model.overrides.num_layers='six': must be int"),
        ("model.overrides.backbone=resnet99", "model.overrides.backbone='resnet99': must be one of 'resnet10',"),
    ],
)
def test_a_bad_value_is_refused_by_key_in_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, None, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_model_overrides_are_typed_to_the_model_fields():
    cfg = load_config(RunConfig, None, ["model.overrides.num_layers='3'", "model.overrides.extra_pool=false"])
    assert cfg.model.overrides == {"num_layers": 3, "extra_pool": False}  # as the model field's type


def test_a_config_made_in_python_is_checked_as_a_loaded_one():
    with pytest.raises(ConfigError, match=r"^data.backend='turbo': must be one of"):
        DataConfig(train_shards="x", backend="turbo").validate()
    cfg = RunConfig()
    cfg.data.train_shards, cfg.optim.lr = "x", -1.0
    with pytest.raises(ConfigError, match=r"^optim.lr=-1.0: must be > 0$"):
        cfg.validate()


# what used to fail deep in the optimiser, be accepted, or print a traceback per rank
REFUSED = [
    (["optim.lr=-1"], "optim.lr=-1: must be > 0"),
    (["train.save_every=-5"], "train.save_every=-5: must be >= 0"),
    (["train.micro_batch=0"], "train.micro_batch=0: must be >= 1"),
    (["train.log_every=0"], "train.log_every=0: must be >= 1"),
    (["data.backend=turbo"], "data.backend='turbo': must be one of 'dali', 'nvjpeg', 'pil'"),
    (["data.image_shorter=900", "data.image_max=800"], "need image_shorter <= image_max"),
    (["train.epochs=0", "train.max_steps=0"], "set train.epochs > 0 or train.max_steps > 0"),
    (["data.dali_reader=webdataset", "data.backend=pil"], "data.dali_reader='webdataset' is a mode of"),
    (["data.train_shards="], "data.train_shards is empty"),
]


@pytest.mark.parametrize("overrides, message", REFUSED, ids=[r[1][:24] for r in REFUSED])
def test_the_command_refuses_in_one_line_before_any_run_folder(overrides, message, tmp_path, capsys):
    from pixelbert_dist.train import run

    run_dir = tmp_path / "run"
    argv = ["--deepspeed_config", ZERO2, f"run_dir={run_dir}", f"data.train_shards={tmp_path}", *overrides]
    assert run.cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("pretrain: config error: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not run_dir.exists()


def test_a_micro_batch_over_a_ranks_share_is_refused_naming_the_sizes():
    from pixelbert_dist.train.config import LoopConfig

    loop = LoopConfig(micro_batch=1000)
    with pytest.raises(ConfigError) as err:
        loop.check_fits(360, world=2)
    assert str(err.value) == (
        "train.micro_batch=1000: the training split has 360 samples, 180 per rank on 2 rank(s), fewer than "
        "one micro-batch (a step of 1000 x 1 x 2 = 2000 would never be full); set train.micro_batch <= 180"
    )
    LoopConfig(micro_batch=180).check_fits(360, world=2)  # exactly one full batch per rank
    loop.check_fits(None, world=2)  # unknown (streamed, no epoch_samples): the loader decides


@pytest.mark.slow
def test_the_trainer_refuses_a_micro_batch_over_the_split_before_the_run_folder(dist_env, shards, tmp_path, capsys):
    from pixelbert_dist.train import run
    from tests.pretrain_helpers import fast_overrides

    run_dir = tmp_path / "run"
    samples = json.loads((shards["train"] / "manifest.json").read_text())["num_samples"]
    argv = ["--deepspeed_config", ZERO2, *fast_overrides(run_dir, shards, val=False), "train.micro_batch=1000"]
    assert run.cli(argv) == 2
    err = capsys.readouterr().err
    assert err == (
        f"pretrain: config error: train.micro_batch=1000: the training split has {samples} samples, {samples} "
        f"per rank on 1 rank(s), fewer than one micro-batch (a step of 1000 x 1 x 1 = 1000 would never be "
        f"full); set train.micro_batch <= {samples}\n"
    )
    assert not run_dir.exists()
