"""Pre-training with two real ranks through the `deepspeed` launcher (CPU, gloo): the
entry point, ZeRO parity, and a SIGTERM'd run that resumes to the uninterrupted losses."""

import json

import pytest

from tests.pretrain_helpers import fast_overrides, run_launcher, sigterm_launcher, train_losses


def pretrain_args(run_dir, shards, steps):
    return ["--deepspeed_config", "deepspeed_configs/zero2.json", *fast_overrides(run_dir, shards, steps)]


@pytest.mark.launcher
def test_zero_stages_follow_zero0_and_export_reloads(shards, tmp_path):
    run_launcher("tests/dist/zero_parity.py", [str(tmp_path), str(shards["train"]), str(shards["val"])])
    results = json.loads((tmp_path / "parity.json").read_text())
    reference = results["0"]["losses"]
    assert len(reference) == 4
    for stage in ("1", "2", "3"):
        for step, loss in reference.items():
            assert abs(results[stage]["losses"][step] - loss) < 1e-4 * max(1.0, abs(loss)), (stage, step)
    for stage, result in results.items():
        assert result["export_max_diff"] < 1e-4, stage


@pytest.mark.launcher
def test_sigterm_then_resume_matches_uninterrupted_run(shards, tmp_path):
    steps = 12
    whole = tmp_path / "whole"
    run_launcher("launch/pretrain.py", pretrain_args(whole, shards, steps))
    expected = train_losses(whole)
    assert (whole / "export" / "model.safetensors").is_file()
    assert (whole / "checkpoints" / "latest").read_text().strip() == f"step_{steps:08d}"

    # Same run, stopped by SIGTERM on every rank (as Slurm does) once a few steps are logged.
    cut = tmp_path / "cut"
    sigterm_launcher("launch/pretrain.py", pretrain_args(cut, shards, steps), cut, after_steps=3)
    stopped_at = int((cut / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 3 <= stopped_at < steps, "the signal should have stopped the run early"
    assert not (cut / "export").exists()

    run_launcher("launch/pretrain.py", pretrain_args(cut, shards, steps))  # resume=auto
    resumed = train_losses(cut)
    assert sorted(resumed) == list(range(1, steps + 1))
    for step in range(stopped_at + 1, steps + 1):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
