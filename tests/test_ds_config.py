"""DeepSpeed JSON filling: "auto" from the run config, contradictions refused, CPU fallbacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pixelbert_dist.config import ConfigError
from pixelbert_dist.distributed import ds_config as dsc
from pixelbert_dist.distributed.ds_config import fill_deepspeed_config, precision_of

CONFIGS = Path(__file__).resolve().parents[1] / "deepspeed_configs"
RUN = dict(micro_batch=4, grad_accum=2, world_size=3, grad_clip=1.0)
_REAL_CAPS = dsc._accelerator_caps
CPU_CAPS = {"fp16": True, "bf16": True, "aio": False, "device": "cpu"}


@pytest.fixture(autouse=True)
def _this_machine(monkeypatch):
    # the real answer on this machine, pinned so the tests read the same on a GPU box
    monkeypatch.setattr(dsc, "_accelerator_caps", lambda: dict(CPU_CAPS))


def _write(tmp_path: Path, data: dict, name: str = "ds.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("name", ["zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero2_fp16"])
def test_shipped_configs_fill(name):
    ds = fill_deepspeed_config(CONFIGS / f"{name}.json", **RUN)
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 4 * 2 * 3
    assert ds["gradient_clipping"] == 1.0
    assert ds["zero_allow_untested_optimizer"] is True
    assert "optimizer" not in ds
    assert "scheduler" not in ds
    assert precision_of(ds) == ("fp16" if name == "zero2_fp16" else "bf16")
    assert ds["zero_optimization"]["stage"] == int(name[4])
    if name == "zero2_fp16":
        assert ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    if name == "zero2_offload":
        assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
        assert ds["zero_force_ds_cpu_optimizer"] is False


def test_missing_keys_filled_and_equal_values_accepted(tmp_path):
    path = _write(
        tmp_path,
        {
            "train_micro_batch_size_per_gpu": 4,
            "gradient_clipping": 1,
            "train_batch_size": 24,
            "zero_optimization": {"stage": 1},
        },
    )
    ds = fill_deepspeed_config(path, **RUN)
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 24
    assert precision_of(ds) == "fp32"


def test_input_dict_not_modified():
    original = {"train_micro_batch_size_per_gpu": "auto", "bf16": {"enabled": True}}
    with pytest.warns(UserWarning, match="enables bf16"):
        fill_deepspeed_config(original, **RUN, precision="fp32")
    assert original == {"train_micro_batch_size_per_gpu": "auto", "bf16": {"enabled": True}}


@pytest.mark.parametrize(
    "key,value,run_key",
    [
        ("train_micro_batch_size_per_gpu", 8, "micro_batch"),
        ("gradient_accumulation_steps", 1, "grad_accum"),
        ("gradient_clipping", 0.5, "grad_clip"),
    ],
)
def test_contradiction_names_file_key_and_values(tmp_path, key, value, run_key):
    path = _write(tmp_path, {key: value}, "mine.json")
    with pytest.raises(ConfigError) as err:
        fill_deepspeed_config(path, **RUN)
    msg = str(err.value)
    assert "mine.json" in msg
    assert key in msg
    assert run_key in msg
    assert str(value) in msg
    assert str(RUN[run_key]) in msg
    assert '"auto"' in msg


def test_train_batch_size_mismatch(tmp_path):
    path = _write(tmp_path, {"train_batch_size": 32}, "tb.json")
    with pytest.raises(ConfigError, match=r"tb\.json.*train_batch_size.*4 x 2 x 3 = 24"):
        fill_deepspeed_config(path, **RUN)


def test_fp16_and_bf16_both_enabled(tmp_path):
    path = _write(tmp_path, {"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "both.json")
    with pytest.raises(ConfigError, match=r"both\.json.*fp16.*bf16.*both enabled"):
        fill_deepspeed_config(path, **RUN)


@pytest.mark.parametrize("section", ["optimizer", "scheduler"])
def test_optimizer_or_scheduler_section_refused(tmp_path, section):
    path = _write(tmp_path, {section: {"type": "AdamW", "params": {"lr": 1e-4}}}, "opt.json")
    with pytest.raises(ConfigError, match=rf"opt\.json.*remove the \"{section}\" section"):
        fill_deepspeed_config(path, **RUN)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match=r"nowhere\.json does not exist"):
        fill_deepspeed_config(tmp_path / "nowhere.json", **RUN)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad\.json is not valid JSON"):
        fill_deepspeed_config(bad, **RUN)


def test_bad_run_values_and_stage(tmp_path):
    with pytest.raises(ConfigError, match="micro_batch must be a positive integer"):
        fill_deepspeed_config({}, **{**RUN, "micro_batch": 0})
    with pytest.raises(ConfigError, match=r"stage\" must be 0, 1, 2 or 3, got 4"):
        fill_deepspeed_config({"zero_optimization": {"stage": 4}}, **RUN)
    with pytest.raises(ConfigError, match="precision must be one of"):
        fill_deepspeed_config({}, **RUN, precision="fp8")


def test_precision_override_and_auto():
    with pytest.warns(UserWarning, match="enables bf16; the run config asks fp32"):
        ds = fill_deepspeed_config(CONFIGS / "zero2.json", **RUN, precision="fp32")
    assert precision_of(ds) == "fp32"
    assert ds["bf16"]["enabled"] is False
    ds = fill_deepspeed_config({"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}, **RUN, precision="fp16")
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0}
    assert ds["bf16"]["enabled"] is False
    assert precision_of(fill_deepspeed_config({"bf16": {"enabled": "auto"}}, **RUN)) == "bf16"


def test_fp16_falls_back_where_the_accelerator_lacks_it(monkeypatch):
    monkeypatch.setattr(dsc, "_accelerator_caps", lambda: {**CPU_CAPS, "fp16": False})
    with pytest.warns(UserWarning, match="fp16 is not supported on this cpu accelerator; falling back to bf16"):
        ds = fill_deepspeed_config(CONFIGS / "zero2_fp16.json", **RUN)
    assert precision_of(ds) == "bf16"
    assert ds["fp16"]["enabled"] is False


def test_nvme_offload_falls_back_to_cpu():
    zero = {
        "stage": 3,
        "offload_param": {"device": "nvme", "nvme_path": "/local_nvme"},
        "offload_optimizer": {"device": "nvme", "nvme_path": "/local_nvme", "pin_memory": True},
    }
    with pytest.warns(UserWarning, match='nvme.*async_io.*offloading to "cpu"'):
        ds = fill_deepspeed_config({"zero_optimization": zero}, **RUN)
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert ds["zero_optimization"]["offload_param"] == {"device": "cpu"}
    assert ds["zero_force_ds_cpu_optimizer"] is False
    with pytest.raises(ConfigError, match='zero_force_ds_cpu_optimizer" must be false'):
        fill_deepspeed_config(
            {
                "zero_force_ds_cpu_optimizer": True,
                "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
            },
            **RUN,
        )


def test_real_accelerator_probe():
    caps = _REAL_CAPS()  # the unpatched probe, asked on this machine
    assert set(caps) == {"fp16", "bf16", "aio", "device"}
    if not torch.cuda.is_available():
        assert caps["device"] == "cpu"


def test_write_round_trip(tmp_path):
    ds = fill_deepspeed_config(CONFIGS / "zero1.json", **RUN)
    path = dsc.write_deepspeed_config(ds, tmp_path / "ds_config.json")
    assert json.loads(path.read_text()) == ds


def test_bare_name_resolves_to_the_shipped_config(tmp_path, monkeypatch, caplog):
    """`deepspeed launch/pretrain.py --deepspeed_config zero2.json` from anywhere: a bare name
    that is no file here is the shipped deepspeed_configs/zero2.json, and the log says so."""
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("WARNING"):
        resolved = dsc.resolve_deepspeed_path("zero2.json")
    assert resolved == dsc.SHIPPED_DIR / "zero2.json"
    assert "using the shipped" in caplog.text
    ds = fill_deepspeed_config("zero2.json", **RUN)
    assert ds["zero_optimization"]["stage"] == 2
    (tmp_path / "zero2.json").write_text('{"zero_optimization": {"stage": 1}}')
    assert dsc.resolve_deepspeed_path("zero2.json") == Path("zero2.json")  # a local file wins
    with pytest.raises(ConfigError, match=r"zero9\.json does not exist.*zero2\.json"):
        fill_deepspeed_config("zero9.json", **RUN)
