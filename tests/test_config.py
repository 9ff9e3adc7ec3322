"""The run config: dataclass defaults <- YAML <- key=value, with strict keys and numbers."""
import pytest
import yaml

from pixelbert_dist.config import ConfigError, load_config
from pixelbert_dist.train.config import RunConfig


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"train": {"micro_batch": 4, "epochs": 2}, "optim": {"lr": "2e-4"}}))
    cfg = load_config(RunConfig, path, ["train.micro_batch=8", "optim.lr=1e-3", "schedule.milestones_epochs=[1,2]",
                                        "model.overrides.num_layers=3"])
    assert cfg.train.micro_batch == 8 and cfg.train.epochs == 2
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)  # YAML 1.1 reads 1e-3 as text
    assert cfg.schedule.milestones_epochs == [1, 2] and cfg.model.overrides == {"num_layers": 3}
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
