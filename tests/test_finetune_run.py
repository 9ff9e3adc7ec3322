"""The fine-tuning scripts end to end, in this process (one gloo rank): VQA, NLVR2 and
retrieval from a tiny export on the synthetic tasks (official file formats), their
results files, the counted skips, the refusals of a wrong export or tokenizer, and the
task loader's exact resume."""

import json
import logging
import re
from pathlib import Path

import pytest
import torch

from pixelbert_dist.finetune.evaluate import build_parser, evaluate
from pixelbert_dist.finetune.run import main as finetune_main
from pixelbert_dist.finetune.score_store import load_score_matrix

REPO = Path(__file__).resolve().parents[1]


def common(ft, run_dir, *extra):
    return [
        "--pretrained",
        str(ft["export"]),
        "--shards",
        *ft["shards"],
        f"run_dir={run_dir}",
        "data.backend=pil",
        "data.num_workers=0",
        "data.image_shorter=64",
        "data.image_max=64",
        "data.max_text_len=24",
        "train.precision=fp32",
        "train.resume=none",
        "train.log_every=5",
        "train.save_every=0",
        "optim.lr=0.0003",
        "optim.cnn_lr=0.003",
        "train.head_lr_mult=1.0",
        "schedule.warmup_steps=1",
        *extra,
    ]


def _with_bad_items(ft, tmp_path):
    """The VQA files plus one train question whose image is not in the shards and one val
    question whose ten answers are all outside the vocabulary."""
    vqa = ft["tasks"] / "vqa"
    out = {}
    for split in ("train", "val"):
        q = json.loads((vqa / f"v2_OpenEnded_mscoco_{split}_questions.json").read_text())
        a = json.loads((vqa / f"v2_mscoco_{split}_annotations.json").read_text())
        ex_q, ex_a = dict(q["questions"][0]), dict(a["annotations"][0])
        ex_q["question_id"] = ex_a["question_id"] = 999990 + len(split)
        if split == "train":
            ex_q["image_id"] = ex_a["image_id"] = 424242  # no such image
        else:
            ex_a["answers"] = [{"answer": "zebra", "answer_id": i + 1} for i in range(10)]
            ex_a["multiple_choice_answer"] = "zebra"
        q["questions"].append(ex_q)
        a["annotations"].append(ex_a)
        out[split] = (tmp_path / f"q_{split}.json", tmp_path / f"a_{split}.json")
        out[split][0].write_text(json.dumps(q))
        out[split][1].write_text(json.dumps(a))
    return out


@pytest.mark.slow
def test_vqa_end_to_end(dist_env, ft, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    files = _with_bad_items(ft, tmp_path)
    vqa = ft["tasks"] / "vqa"
    run_dir = tmp_path / "run"
    results = finetune_main(
        "vqa",
        [
            *common(ft, run_dir, "train.micro_batch=16", "train.max_steps=6", "train.log_every=1"),
            "--train-questions",
            str(files["train"][0]),
            "--train-annotations",
            str(files["train"][1]),
            "--val-questions",
            str(files["val"][0]),
            "--val-annotations",
            str(files["val"][1]),
            "--test-questions",
            str(vqa / "v2_OpenEnded_mscoco_test_questions.json"),
            "--image-map",
            str(vqa / "image_ids.json"),
        ],
    )
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["metrics"] == json.loads(json.dumps(results["metrics"]))
    # the bad items are counted, not silently dropped
    assert saved["skipped"]["train_images"]["questions_missing_image"] == 1
    assert saved["skipped"]["val_answers"]["answers_oov"] >= 10
    # official submission files, one answer per question
    test_ids = {
        q["question_id"] for q in json.loads((vqa / "v2_OpenEnded_mscoco_test_questions.json").read_text())["questions"]
    }
    submitted = json.loads((run_dir / "vqa_test_results.json").read_text())
    assert {r["question_id"] for r in submitted} == test_ids
    assert all(isinstance(r["answer"], str) for r in submitted)
    # the console: both learning rates labelled on the progress lines; the summary's best
    # line is the task's score (the last split evaluated, test, has only a count)
    assert re.search(r"step 6/6 .* cnn_lr \d\.\d\de[-+]\d\d lr \d\.\d\de[-+]\d\d head_lr ", caplog.text)
    (best,) = [line for line in caplog.text.splitlines() if line.startswith("  best: ")]
    assert re.fullmatch(r"  best: val/overall=[\d.]+ \(step \d\)", best), best
    val = saved["metrics"]["val"]
    print(
        "VQA held-out:", val, "blind:", ft["summary"]["baselines"]["vqa_val_blind"], "train s:", saved["train_seconds"]
    )
    assert val["num_questions"] == ft["summary"]["vqa_questions"]["val"] + 1
    assert 0.0 <= val["overall"] <= 100.0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert losses[-1] < losses[0]
    assert (run_dir / "tensorboard").is_dir()
    assert (run_dir / "answer_vocab.json").is_file()


@pytest.mark.slow
def test_nlvr2_end_to_end(dist_env, ft, tmp_path):
    nlvr2 = ft["tasks"] / "nlvr2"
    run_dir = tmp_path / "run"
    results = finetune_main(
        "nlvr2",
        [
            *common(
                ft, run_dir, "train.micro_batch=8", "train.max_steps=3", "train.log_every=1", "train.eval_minutes=1e-9"
            ),
            "--train",
            str(nlvr2 / "train.json"),
            "--dev",
            str(nlvr2 / "dev.json"),
            "--test",
            str(nlvr2 / "test1.json"),
            "--image-map",
            str(nlvr2 / "images.json"),
        ],
    )
    dev = results["metrics"]["dev"]
    print("NLVR2 dev:", dev, "majority:", ft["summary"]["baselines"]["nlvr2_dev_majority"])
    assert dev["num_examples"] == ft["summary"]["nlvr2_examples"]["dev"]
    lines = (run_dir / "nlvr2_test_predictions.csv").read_text().splitlines()
    assert len(lines) == ft["summary"]["nlvr2_examples"]["test1"]
    assert all(line.rsplit(",", 1)[1] in ("True", "False") for line in lines)
    assert results["skipped"]["dev_images"]["images_missing"] == 0
    # dev on the way (here: every log step, train.eval_minutes ~ 0), test once at the end
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "dev"] == [1, 2, 3]
    assert [r["step"] for r in rows if r["split"] == "test"] == [3]


def test_retrieval_end_to_end(dist_env, ft, tmp_path):
    run_dir = tmp_path / "run"
    results = finetune_main(
        "retrieval",
        [
            *common(
                ft,
                run_dir,
                "train.micro_batch=8",
                "train.max_steps=3",
                "train.freeze_cnn=true",
                "retrieval.train_splits=[train]",
                "retrieval.eval_split=test",
                "train.eval_every=2",
                "retrieval.num_negatives=6",
                "retrieval.hard_negatives=2",
                "retrieval.key_format='{stem}'",
            ),
            "--karpathy",
            str(ft["tasks"] / "retrieval" / "dataset_synthetic.json"),
        ],
    )
    test = results["metrics"]["test"]
    print("retrieval test:", test)
    assert test["num_images"] == ft["summary"]["retrieval_images"]["test"]
    assert set(test) >= {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "r_mean"}
    # val every train.eval_every steps, test once at the end
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in rows if r["split"] != "train"] == [(2, "val"), (3, "val"), (3, "test")]
    scores = load_score_matrix(run_dir / "scores" / "retrieval_test", test["num_images"], test["num_texts"])
    assert scores.shape == (test["num_images"], test["num_texts"])
    # the evaluation command, from the run's last checkpoint, gives the run's test numbers
    again = evaluate(build_parser().parse_args(["--run", str(run_dir), "--split", "test"]))
    assert again["test"] == pytest.approx(test)
    assert json.loads((run_dir / "eval" / "results_test.json").read_text())["metrics"] == pytest.approx(test)


def test_wrong_export_or_tokenizer_is_refused(dist_env, ft, tmp_path):
    vqa = ft["tasks"] / "vqa"
    args = common(ft, tmp_path / "run") + [
        "--train-questions",
        str(vqa / "v2_OpenEnded_mscoco_train_questions.json"),
        "--train-annotations",
        str(vqa / "v2_mscoco_train_annotations.json"),
        "--image-map",
        str(vqa / "image_ids.json"),
    ]
    with pytest.raises(ValueError, match="is not a 'pixelbert-r50' export"):
        finetune_main("vqa", [*args, "preset=pixelbert-r50"])
    other = tmp_path / "vocab"
    other.mkdir()
    (other / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nred\n")
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        finetune_main("vqa", [*args, f"data.vocab_dir={other}"])
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        finetune_main("vqa", [*args, "--pretrained", str(tmp_path)])
    assert not (tmp_path / "run").exists()


@pytest.mark.launcher
def test_nlvr2_under_the_deepspeed_launcher_two_ranks(ft, tmp_path):
    """Two CPU ranks through the real `deepspeed` launcher: the ranks split the examples
    (the odd count makes a wrap-around repeat), and the gathered predictions still cover
    every dev example exactly once."""
    from tests.pretrain_helpers import run_launcher

    nlvr2 = ft["tasks"] / "nlvr2"
    dev = tmp_path / "dev.json"
    lines = (nlvr2 / "dev.json").read_text().splitlines()
    dev.write_text("\n".join(lines[: len(lines) - 1 if len(lines) % 2 == 0 else len(lines)]) + "\n")
    run_dir = tmp_path / "run"
    run_launcher(
        "launch/finetune_nlvr2.py",
        [
            *common(ft, run_dir, "train.micro_batch=4", "train.max_steps=2"),
            "--train",
            str(nlvr2 / "train.json"),
            "--dev",
            str(dev),
            "--image-map",
            str(nlvr2 / "images.json"),
        ],
    )
    results = json.loads((run_dir / "results.json").read_text())
    n_dev = len(dev.read_text().splitlines())
    assert results["world_size"] == 2
    assert n_dev % 2 == 1
    assert results["metrics"]["dev"]["num_examples"] == n_dev == results["eval_examples"]["dev"]
    assert len((run_dir / "nlvr2_dev_predictions.csv").read_text().splitlines()) == n_dev


@pytest.mark.slow
def test_resume_continues_like_an_uninterrupted_run(dist_env, ft, tmp_path):
    """2 steps, stop, resume to 4 == 4 steps in one go (loader position, RNG, optimiser)."""
    nlvr2 = ft["tasks"] / "nlvr2"

    def run(run_dir, steps, resume):
        finetune_main(
            "nlvr2",
            [
                *common(
                    ft,
                    run_dir,
                    "train.micro_batch=4",
                    f"train.max_steps={steps}",
                    "train.log_every=1",
                    "schedule.kind=constant",
                    "schedule.warmup_steps=0",
                    f"train.resume={resume}",
                ),
                "--train",
                str(nlvr2 / "train.json"),
                "--image-map",
                str(nlvr2 / "images.json"),
            ],
        )
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}

    whole = run(tmp_path / "whole", 4, "none")
    run(tmp_path / "cut", 2, "none")
    resumed = run(tmp_path / "cut", 4, "latest")  # the cut run finished its 2 steps: auto would refuse it
    assert sorted(whole) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert resumed[step] == pytest.approx(whole[step], rel=1e-5, abs=1e-6), step


def _nlvr2_trainer(ft, run_dir, *extra):
    """A FinetuneTrainer for NLVR2 built from the launch script's own command line."""
    from pixelbert_dist.finetune.run import parse_config
    from pixelbert_dist.finetune.trainer import FinetuneTrainer

    nlvr2 = ft["tasks"] / "nlvr2"
    argv = [
        *common(ft, run_dir, "train.micro_batch=4", "train.log_every=1", *extra),
        "--train",
        str(nlvr2 / "train.json"),
        "--image-map",
        str(nlvr2 / "images.json"),
    ]
    return FinetuneTrainer(parse_config("nlvr2", argv), "deepspeed_configs/zero2.json")


def _train_losses(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


@pytest.mark.slow
def test_finetune_skips_nonfinite_losses_and_stops_after_too_many(dist_env, ft, tmp_path):
    """The shared loop's NaN/inf guard in fine-tuning: poisoned micro-batches are skipped
    on every rank and counted, the weights and BatchNorm statistics stay finite; too many
    in a row stop the run, leaving the last checkpoint as it was."""
    from pixelbert_dist.train.window import NonFiniteLossError
    from tests.pretrain_helpers import poison_images

    run = _nlvr2_trainer(ft, tmp_path / "run", "train.max_steps=4")
    poison_images(run, lambda i: i in (1, 2))
    results = run.fit()
    assert results["steps"] == 4
    assert run.state["nonfinite_skipped"] == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_skipped"] for r in rows if r["split"] == "train"] == [0, 2, 2, 2]
    assert sorted(_train_losses(tmp_path / "run")) == [1, 2, 3, 4]
    assert all(map(torch.isfinite, torch.tensor(list(_train_losses(tmp_path / "run").values()))))
    assert all(torch.isfinite(p).all() for p in run.engine.module.parameters())
    assert all(torch.isfinite(b.float()).all() for b in run.engine.module.buffers())  # BatchNorm statistics too

    stopped = _nlvr2_trainer(
        ft, tmp_path / "stopped", "train.max_steps=6", "train.save_every=2", "train.max_nonfinite_in_row=3"
    )
    poison_images(stopped, lambda i: i >= 2)  # two good steps (a checkpoint at step 2), then only NaN
    with pytest.raises(NonFiniteLossError, match=r"3 NaN/inf losses in a row at step 2 .*max_nonfinite_in_row=3"):
        stopped.fit()
    assert (tmp_path / "stopped" / "checkpoints" / "latest").read_text().strip() == "step_00000002"


@pytest.mark.slow
def test_finetune_sigterm_then_resume_matches_uninterrupted_run(dist_env, ft, tmp_path):
    """SIGTERM (Slurm's stop) in the middle of a fine-tuning run: the shared loop saves at
    the end of that step and returns; the rerun resumes there and logs the losses of the
    run that was never stopped."""
    import os
    import signal

    extra = ("train.max_steps=5", "schedule.kind=constant", "schedule.warmup_steps=0")
    whole = _nlvr2_trainer(ft, tmp_path / "whole", *extra)
    whole.fit()
    expected = _train_losses(tmp_path / "whole")

    cut = _nlvr2_trainer(ft, tmp_path / "cut", *extra)
    to_device, calls = cut.to_device, []

    def signal_at_third_micro_batch(batch):
        calls.append(batch)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the loop's GracefulExit
        return to_device(batch)

    cut.to_device = signal_at_third_micro_batch
    assert cut.fit() == {"stopped_at_step": 3}
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert not (tmp_path / "cut" / "results.json").exists()

    resumed = _nlvr2_trainer(ft, tmp_path / "cut", *extra, "train.resume=auto")
    assert resumed.state["step"] == 3
    assert resumed.fit()["steps"] == 5
    losses = _train_losses(tmp_path / "cut")
    assert sorted(losses) == sorted(expected) == [1, 2, 3, 4, 5]
    for step in expected:
        assert losses[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
