"""The evaluation command: zero-shot retrieval from a pre-training export, in this process
(one rank) and under the real deepspeed launcher (two CPU ranks, each scoring and keeping
only its own rows): the same recalls."""

from __future__ import annotations

import json

import pytest

from pixelbert_dist.finetune.evaluate import build_parser, evaluate


def _args(ft, out) -> list[str]:
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
        "test",
        "--out",
        str(out),
        "retrieval.key_format='{stem}'",
        "retrieval.max_eval_images=10",
        "train.eval_batch=3",
        "data.backend=pil",
        "data.num_workers=0",
        "data.image_shorter=64",
        "data.image_max=64",
    ]


@pytest.mark.launcher
def test_zero_shot_retrieval_on_two_ranks_equals_one_rank(dist_env, ft, tmp_path):
    from tests.pretrain_helpers import run_launcher

    one = evaluate(build_parser().parse_args(_args(ft, tmp_path / "one")))["test"]
    assert one["num_images"] == ft["summary"]["retrieval_images"]["test"]
    run_launcher("launch/evaluate.py", _args(ft, tmp_path / "two"))
    two = json.loads((tmp_path / "two" / "results_test.json").read_text())["metrics"]
    assert two == pytest.approx(one)
    ranks = sorted(p.name for p in (tmp_path / "two" / "scores" / "retrieval_test").iterdir())
    assert ranks == ["rank00000", "rank00001"]  # each rank kept only its own rows
