"""The fine-tuning export: checksums verified on load, fp32 copies that leave the caller's
model alone, eval mode, one file mode, and the input settings fine-tuning needs."""

import hashlib
import json
import logging
import os
import stat

import pytest
import torch

from pixelbert_dist.config import load_config, save_config
from pixelbert_dist.data.decode.images import MEAN_255
from pixelbert_dist.data.text import load_tokenizer
from pixelbert_dist.model import PixelBert, build_model
from pixelbert_dist.train.config import RunConfig
from pixelbert_dist.train.export import _saved_run_config, write_export


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("export")
    model = build_model("tiny")
    return model.save_pretrained(folder, load_tokenizer()), model


def copy_export(src, dst):
    dst.mkdir()
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    return dst


def test_config_records_sha256_and_loads_back_equal_in_eval_mode(export):
    folder, model = export
    record = json.loads((folder / "config.json").read_text())
    weights = (folder / "model.safetensors").read_bytes()
    assert record["files"]["model.safetensors"] == {
        "sha256": hashlib.sha256(weights).hexdigest(),
        "bytes": len(weights),
    }
    assert record["tokenizer"] == {"class": "BertTokenizer", "vocab_size": 512, "do_lower_case": True}
    loaded = PixelBert.from_pretrained(folder)
    assert not loaded.training
    assert not any(m.training for m in loaded.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded.mlm_head.decoder.weight is loaded.embeddings.word_embeddings.weight


def test_every_exported_file_has_mode_0644(export):
    folder, _ = export
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in folder.iterdir()}
    assert {"config.json", "model.safetensors", "vocab.txt"} <= set(modes)
    assert set(modes.values()) == {0o644}, modes


def test_truncated_weights_are_refused_naming_the_file(export, tmp_path):
    folder = copy_export(export[0], tmp_path / "cut")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=rf"{weights}.*bytes, config.json records .*truncated"):
        PixelBert.from_pretrained(folder)


def test_overwritten_bytes_are_refused_naming_the_file(export, tmp_path):
    folder = copy_export(export[0], tmp_path / "flipped")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 1000] = os.urandom(1000)  # inside the tensor payload
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{weights} does not match the sha256 in config.json"):
        PixelBert.from_pretrained(folder)


def test_export_without_checksums_is_refused_unless_asked_for(export, tmp_path, caplog):
    folder = copy_export(export[0], tmp_path / "old")
    record = json.loads((folder / "config.json").read_text())
    del record["files"]
    (folder / "config.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"records no checksums.*allow_unverified=True"):
        PixelBert.from_pretrained(folder)
    with caplog.at_level(logging.WARNING):
        PixelBert.from_pretrained(folder, allow_unverified=True)
    assert "records no checksums" in caplog.text


@pytest.mark.parametrize(
    "key, value, named",
    [
        ("num_heads", 8, "config.num_heads: 8 in config.json, 4 in the weights"),
        ("extra_pool", False, "config.extra_pool: False in config.json, True in the weights"),
    ],
)
def test_an_edited_config_json_that_keeps_the_shapes_is_refused(export, tmp_path, key, value, named):
    folder = copy_export(export[0], tmp_path / "edited")
    record = json.loads((folder / "config.json").read_text())
    record["config"][key] = value
    (folder / "config.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=rf"describes another model than .* was exported with \(.*{named}"):
        PixelBert.from_pretrained(folder)


def test_an_edited_preset_name_is_refused(tmp_path):
    folder = build_model("tiny").save_pretrained(tmp_path / "export", extra={"preset": "tiny"})
    record = json.loads((folder / "config.json").read_text())
    record["preset"] = "pixelbert-r50"
    (folder / "config.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"preset: 'pixelbert-r50' in config.json, 'tiny' in the weights"):
        PixelBert.from_pretrained(folder)


def test_save_pretrained_leaves_a_bf16_model_in_bf16(tmp_path):
    model = build_model("tiny").to(torch.bfloat16).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "bf16")
    assert model.training
    for key, value in model.state_dict().items():
        assert value.dtype == before[key].dtype, key
        assert torch.equal(value, before[key]), key
    loaded = PixelBert.from_pretrained(tmp_path / "bf16")
    assert loaded.embeddings.word_embeddings.weight.dtype == torch.float32
    torch.testing.assert_close(
        loaded.embeddings.word_embeddings.weight, before["embeddings.word_embeddings.weight"].float(), atol=0, rtol=0
    )


def test_export_config_carries_the_input_settings(tmp_path):
    run_cfg = load_config(
        RunConfig,
        overrides=["data.image_shorter=320", "data.image_max=512", "data.max_text_len=24", "model.preset=tiny"],
    )
    model = build_model("tiny")
    out = write_export(
        model.config, model.state_dict(), tmp_path / "export", load_tokenizer(), {"checkpoint": "step_1"}, run_cfg
    )
    record = json.loads((out / "config.json").read_text())
    assert record["preset"] == "tiny"
    assert record["checkpoint"] == "step_1"
    inputs = record["inputs"]
    assert (inputs["image_shorter"], inputs["image_max"], inputs["max_text_len"]) == (320, 512, 24)
    assert inputs["image_mean_255"] == list(MEAN_255)
    assert inputs["pad_multiple"] == 64
    assert inputs["tokenizer_dir"] == "the shipped synthetic vocab"


def test_engine_export_reads_the_input_settings_from_the_run_folder(tmp_path):
    """export_from_engine, given no run config, takes the one the Trainer wrote beside
    the checkpoints folder."""
    run_cfg = load_config(RunConfig, overrides=["data.image_shorter=320", "data.image_max=512"])
    save_config(run_cfg, tmp_path / "config.yaml")
    assert _saved_run_config(tmp_path / "checkpoints").data.image_max == 512
    assert _saved_run_config(tmp_path / "elsewhere" / "checkpoints") is None


@pytest.mark.parametrize("command", ["finetune", "evaluate"])
def test_the_commands_load_an_export_without_checksums_only_when_asked(export, tmp_path, command):
    """The fine-tuning and evaluation commands refuse such an export, naming their flag,
    and load it (the same weights) with --allow-unverified-weights."""
    from pixelbert_dist.finetune import evaluate
    from pixelbert_dist.finetune.run import parse_config
    from pixelbert_dist.finetune.trainer import load_export

    folder = copy_export(export[0], tmp_path / "old")
    record = json.loads((folder / "config.json").read_text())
    del record["files"]
    (folder / "config.json").write_text(json.dumps(record))

    def config(*flags):
        argv = ["--pretrained", str(folder), *flags]
        if command == "finetune":
            return parse_config("vqa", argv)
        args = evaluate.build_parser().parse_args([*argv, "--shards", str(tmp_path), f"--out={tmp_path / 'eval'}"])
        return evaluate.config_from_args(args)[0]

    with pytest.raises(ValueError, match=r"records no checksums.*--allow-unverified-weights"):
        load_export(config())
    loaded, _ = load_export(config("--allow-unverified-weights"))
    want = export[1].state_dict()
    assert all(torch.equal(tensor, want[name]) for name, tensor in loaded.state_dict().items())
