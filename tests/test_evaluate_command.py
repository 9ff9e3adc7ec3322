"""The evaluation command: zero-shot retrieval from a pre-training export, in this process
(one rank) and under the real deepspeed launcher (two CPU ranks, each scoring and keeping
only its own rows): the same recalls. A real SIGTERM to an evaluation process keeps its
finished batches; the rerun resumes after them and gives the uninterrupted recalls."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from pixelbert_dist.finetune.evaluate import build_parser, evaluate


def _args(ft, out, split: str = "test", *overrides: str) -> list[str]:
    return [
        "--pretrained",
        str(ft["export"]),
        "--task",
        "retrieval",
        "--shards",
        *ft["shards"],
        "--karpathy",
        str(ft["tasks"] / "retrieval" / "dataset_synthetic.json"),
        "--split",
        split,
        "--out",
        str(out),
        "retrieval.key_format='{stem}'",
        "retrieval.max_eval_images=10",
        "train.eval_batch=3",
        "data.backend=pil",
        "data.num_workers=0",
        "data.image_shorter=64",
        "data.image_max=64",
        *overrides,
    ]


# two-stage on 12 training images (the test split has 9, fewer than k): each caption's
# 10 best images are merged over the ranks; 128 px images give 2x2 pixels, the first stage 1
RERANK = (
    "retrieval.eval_split=train",
    "retrieval.max_eval_images=12",
    "retrieval.rerank_k=10",
    "retrieval.rerank_pixels=1",
    "data.image_shorter=128",
    "data.image_max=128",
)


@pytest.mark.launcher
@pytest.mark.parametrize("split, overrides", [("test", ()), ("train", RERANK)], ids=["full", "rerank"])
def test_zero_shot_retrieval_on_two_ranks_equals_one_rank(dist_env, ft, tmp_path, split, overrides):
    from tests.pretrain_helpers import run_launcher

    one = evaluate(build_parser().parse_args(_args(ft, tmp_path / "one", split, *overrides)))[split]
    if not overrides:
        assert one["num_images"] == ft["summary"]["retrieval_images"]["test"]
    run_launcher("launch/evaluate.py", _args(ft, tmp_path / "two", split, *overrides))
    two = json.loads((tmp_path / "two" / f"results_{split}.json").read_text())["metrics"]
    assert two == pytest.approx(one)
    stores = list((tmp_path / "two" / "scores").iterdir())
    assert len(stores) == (2 if overrides else 1)  # two-stage: the first stage's store and the re-ranking's
    for store in stores:
        assert sorted(p.name for p in store.iterdir()) == ["rank00000", "rank00001"]  # each rank its own rows


@pytest.mark.slow
def test_sigterm_mid_evaluation_then_rerun_gives_the_uninterrupted_recalls(dist_env, ft, tmp_path):
    from tests.pretrain_helpers import REPO, launch_env

    # 24 training images in 8 batches of 3: after the first is on disk, seven are left to be
    # stopped in, however fast this machine is
    more = ("retrieval.eval_split=train", "retrieval.max_eval_images=24")
    args = _args(ft, tmp_path / "cut", "train", *more)
    whole = evaluate(build_parser().parse_args(_args(ft, tmp_path / "whole", "train", *more)))["train"]
    proc = subprocess.Popen(
        [sys.executable, "launch/evaluate.py", *args],
        cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    rows = tmp_path / "cut" / "scores" / "retrieval_train" / "rank00000"
    deadline = time.time() + 300
    while not (rows / "batch000000.safetensors").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "evaluate: stopped by SIGTERM: retrieval train:" in err and "the same command resumes" in err, err
    kept = {p.name: p.stat().st_mtime_ns for p in rows.glob("batch*.safetensors")}
    assert 1 <= len(kept) < 8 and not (tmp_path / "cut" / "results_train.json").exists()
    resumed = evaluate(build_parser().parse_args(args))["train"]  # the same command, to the end
    assert resumed == whole
    assert kept == {name: (rows / name).stat().st_mtime_ns for name in kept}  # not scored again
