"""Pre-training in this process (one gloo rank): the Trainer end to end, the export, and
the run-config checks that must stop a run before it starts."""

import json

import pytest
import torch
import yaml

from pixelbert_dist.config import ConfigError, load_config
from pixelbert_dist.model import PixelBert
from pixelbert_dist.train import run
from pixelbert_dist.train.config import RunConfig
from tests.fixtures_data import make_synthetic_shards
from tests.pretrain_helpers import fast_overrides, poison_images, train_losses


@pytest.mark.slow
def test_trainer_trains_checkpoints_and_exports(dist_env, shards, tmp_path):
    from pixelbert_dist.train.trainer import Trainer

    cfg = load_config(RunConfig, None, fast_overrides(tmp_path / "run", shards, steps=8))
    trainer = Trainer(cfg, "deepspeed_configs/zero2.json")
    final = trainer.fit()
    run_dir = tmp_path / "run"
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, 9))
    assert all(map(torch.isfinite, torch.tensor(list(losses.values()))))
    assert {"itm_acc", "mlm_acc", "i2t_r1", "t2i_r1"} <= set(final)
    assert final["step"] == 8  # the final model
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = set().union(*(r.keys() for r in rows if r["split"] == "train"))
    assert {
        "lr_cnn",
        "lr_transformer_decay",
        "grad_norm",
        "loss_scale",
        "samples_per_s",
        "tflops_per_gpu",
        "data_wait_frac",
        "peak_mem_gib",
        "mlm_acc",
        "itm_acc",
    } <= logged
    # checkpoints every 4 steps, keep-last, `latest`; the resolved configs in the run folder
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["micro_batch"] == 4
    ds = json.loads((run_dir / "deepspeed_config.json").read_text())
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["zero_optimization"]["stage"] == 2
    # the export reloads without DeepSpeed and gives the trained engine's outputs
    export = PixelBert.from_pretrained(run_dir / "export").eval()
    batch = trainer.to_device(next(iter(trainer.val_loader)))
    trainer.engine.eval()
    with torch.no_grad():
        torch.testing.assert_close(export(batch)["itm_logits"], trainer.engine.module(batch)["itm_logits"])
    assert (run_dir / "export" / "vocab.txt").is_file()


def _write(path, data):
    path.write_text(json.dumps(data) if path.suffix == ".json" else yaml.safe_dump(data))
    return str(path)


def test_contradictory_configs_are_refused(dist_env, shards, tmp_path):
    ds = _write(tmp_path / "ds.json", {"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 2}})
    with pytest.raises(
        ConfigError,
        match=r"ds\.json: \"train_micro_batch_size_per_gpu\": 16 contradicts the run config \(micro_batch=4\)",
    ):
        run.main(["--deepspeed_config", ds, *fast_overrides(tmp_path / "r", shards)])
    assert not (tmp_path / "r").exists()  # refused before anything was written
    with pytest.raises(ConfigError, match="unknown config key"):
        run.main(["--deepspeed_config", "deepspeed_configs/zero2.json", "train.micro_bacth=3"])
    bad_yaml = _write(tmp_path / "bad.yaml", {"train": {"epochs": 1}, "optim": {"lrr": 1}})
    with pytest.raises(ConfigError, match=r"bad\.yaml.*optim\.lrr"):
        run.main(["--deepspeed_config", "deepspeed_configs/zero2.json", "--config", bad_yaml])
    with pytest.raises(SystemExit, match="no such file"):
        run.main(["--deepspeed_config", str(tmp_path / "missing.json")])
    with pytest.raises(ValueError, match="data.train_shards is empty"):
        run.main(["--deepspeed_config", "deepspeed_configs/zero2.json"])


@pytest.mark.slow
def test_visual_warmstart_learns_the_scene_words_and_loads_into_pretraining(tmp_path):
    from safetensors.torch import load_file, save_file

    from pixelbert_dist.model import build_model, load_visual_weights
    from pixelbert_dist.train.trainer import build_run_model
    from pixelbert_dist.train.visual_warmstart import WORDS, scene_targets, warmstart_visual

    targets = scene_targets(
        [{"background": "noisy", "objects": [{"color": "red", "shape": "star"}, {"color": "blue", "shape": "star"}]}]
    )
    assert targets.sum() == 4
    assert targets[0, WORDS.index("star")] == 1
    assert targets[0, WORDS.index("noisy")] == 1
    shards = make_synthetic_shards(tmp_path / "shards", num=240, samples_per_shard=120)  # enough to generalise
    cfg = load_config(
        RunConfig,
        overrides=[
            f"data.train_shards={shards['train']}",
            f"data.val_shards={shards['val']}",
            "data.backend=pil",
            "data.num_workers=0",
            "data.image_shorter=64",
            "data.image_max=128",
            "model.overrides.extra_pool=false",
        ],
    )
    model = build_run_model(cfg.model)
    untrained = {k: v.clone() for k, v in model.visual.state_dict().items()}
    result = warmstart_visual(cfg, model, tmp_path / "visual.safetensors", steps=100, batch_size=16, lr=3e-3)
    assert result["steps"] == 100
    assert result["val_label_accuracy"] > result["val_all_absent_accuracy"] + 0.05, result
    saved = load_file(tmp_path / "visual.safetensors")
    assert set(saved) == {f"visual.{k}" for k in untrained}
    assert not torch.equal(saved["visual.proj.weight"], untrained["proj.weight"])

    fresh = build_model("tiny", extra_pool=False)
    load_visual_weights(fresh, tmp_path / "visual.safetensors")
    assert torch.equal(fresh.visual.backbone.conv1.weight, saved["visual.backbone.conv1.weight"])
    del saved["visual.proj.bias"]
    save_file(saved, tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match=r"partial\.safetensors.*missing \['visual\.proj\.bias'\]"):
        load_visual_weights(fresh, tmp_path / "partial.safetensors")


def test_freeze_prefixes(shards):
    from pixelbert_dist.train.config import ModelSection
    from pixelbert_dist.train.trainer import build_run_model

    model = build_run_model(ModelSection(preset="tiny", freeze=["embeddings.word_embeddings"]))
    assert not model.mlm_head.decoder.weight.requires_grad  # tied to the frozen embeddings
    assert model.embeddings.position_embeddings.weight.requires_grad
    with pytest.raises(ValueError, match="no parameter name starts with 'nope'"):
        build_run_model(ModelSection(preset="tiny", freeze=["nope"]))


@pytest.mark.slow
def test_nonfinite_losses_are_skipped_counted_and_stop_the_run(dist_env, shards, tmp_path):
    """Micro-batches whose images turn to NaN (a corrupt decode, say) are skipped on every
    rank and counted; too many in a row stop the run with a clear error, writing nothing."""
    from pixelbert_dist.train.trainer import Trainer
    from pixelbert_dist.train.window import NonFiniteLossError

    def trainer(run_dir, *extra):
        overrides = fast_overrides(run_dir, shards, steps=6, val=False) + ["train.export=false", *extra]
        return Trainer(load_config(RunConfig, None, overrides), "deepspeed_configs/zero2.json")

    run = trainer(tmp_path / "run", "train.save_every=0")
    poison_images(run, lambda i: i in (2, 3))
    run.fit()
    assert run.state["step"] == 6
    assert run.state["nonfinite_skipped"] == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_skipped"] for r in rows if r["split"] == "train"][-1] == 2
    assert all(map(torch.isfinite, torch.tensor(list(train_losses(tmp_path / "run").values()))))
    assert all(torch.isfinite(p).all() for p in run.engine.module.parameters())
    assert all(torch.isfinite(b.float()).all() for b in run.engine.module.buffers())  # BatchNorm statistics too

    stopped = trainer(tmp_path / "stopped", "train.max_nonfinite_in_row=3", "train.save_every=2")
    poison_images(stopped, lambda i: i >= 2)  # two good steps (a checkpoint at step 2), then only NaN
    with pytest.raises(NonFiniteLossError, match=r"3 NaN/inf losses in a row at step 2 .*max_nonfinite_in_row=3"):
        stopped.fit()
    assert (tmp_path / "stopped" / "checkpoints" / "latest").read_text().strip() == "step_00000002"


def test_bad_input_stops_before_training_with_a_clear_message(dist_env, shards, tmp_path):
    from pixelbert_dist.train.trainer import Trainer

    def trainer(*extra):
        overrides = fast_overrides(tmp_path / "run", shards, steps=2) + list(extra)
        return Trainer(load_config(RunConfig, None, overrides), "deepspeed_configs/zero2.json")

    with pytest.raises(Exception, match="nowhere"):
        trainer(f"data.train_shards={tmp_path / 'nowhere'}")
    with pytest.raises(KeyError, match="unknown model preset 'nope'"):
        trainer("model.preset=nope")
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(ValueError, match=r"run_dir=.*a_file/run' is not a writable folder"):
        trainer(f"run_dir={tmp_path / 'a_file' / 'run'}")
