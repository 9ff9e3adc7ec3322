"""One key convention between make_shards and the fine-tuning readers (issue 14 item 4):
shards built the documented way are found with the readers' defaults, a mismatch says
which key was wanted and which were found, and missing demo task files name the command
that makes them (issue 14 item 8)."""

from __future__ import annotations

import json

import pytest

from pixelbert_dist.config import load_config
from pixelbert_dist.data.builders import build_coco, build_images
from pixelbert_dist.data.text import load_tokenizer
from pixelbert_dist.finetune.config import FinetuneConfig
from pixelbert_dist.finetune.data import KeyedImages
from pixelbert_dist.finetune.tasks import make_task
from tests.fixtures_data import write_image, write_karpathy

FAST = {"samples_per_shard": 4, "workers": 0, "progress": False}
MAKE_TASKS = "python -m pixelbert_dist.finetune.synthetic_tasks --shards data/synthetic --out data/tasks"


def _task(tmp_path, shards, *overrides):
    cfg = load_config(FinetuneConfig, None, ["pretrained=unused", *overrides])
    images = KeyedImages([str(s) for s in shards])
    return make_task(cfg, load_tokenizer(), images, tmp_path / "run")


@pytest.mark.parametrize("flickr", [False, True])
def test_retrieval_defaults_find_karpathy_shards(tmp_path, flickr):
    fx = write_karpathy(tmp_path / "src", flickr=flickr)
    build_coco(tmp_path / "shards", fx["images"], karpathy_json=fx["karpathy"], **FAST)
    shards = [tmp_path / "shards" / split for split in ("train", "val", "test")]
    task = _task(tmp_path, shards, "task=retrieval", f"retrieval.karpathy={fx['karpathy']}")
    assert len(task.train_keys) == len(fx["expected"]["train"]) == 3
    assert len(task.eval_splits["test"]) == len(fx["expected"]["test"]) == 2
    assert task.train_keys[0] == ("flickr30k0" if flickr else "coco1")
    assert task.skipped["train_images"]["images_missing"] == 0


def test_retrieval_key_mismatch_names_wanted_and_found_keys(tmp_path):
    fx = write_karpathy(tmp_path / "src")
    build_coco(tmp_path / "shards", fx["images"], karpathy_json=fx["karpathy"], **FAST)
    with pytest.raises(
        ValueError,
        match=r"0 images found.*wanted key 'COCO_train2014_000000000001' "
        r"\(retrieval.key_format='\{stem\}'.*found keys like 'coco1'",
    ):
        _task(
            tmp_path,
            [tmp_path / "shards" / "train"],
            "task=retrieval",
            f"retrieval.karpathy={fx['karpathy']}",
            "retrieval.key_format='{stem}'",
        )


def _vqa_files(root, image_ids):
    questions = [{"image_id": i, "question": "what colour is it?", "question_id": 10 * i} for i in image_ids]
    answers = [{"question_id": 10 * i, "image_id": i, "answers": [{"answer": "red"}] * 10} for i in image_ids]
    (root / "q.json").write_text(json.dumps({"questions": questions}))
    (root / "a.json").write_text(json.dumps({"annotations": answers}))
    return [f"vqa.train_questions={root / 'q.json'}", f"vqa.train_annotations={root / 'a.json'}"]


def test_vqa_defaults_find_image_only_test2015_shards_and_name_a_mismatch(tmp_path):
    for image_id in (1, 57):
        write_image(tmp_path / "test2015" / f"COCO_test2015_{image_id:012d}.jpg", "rgb", seed=image_id)
    build_images(tmp_path / "shards", [tmp_path / "test2015"], "coco", **FAST)
    task = _task(tmp_path, [tmp_path / "shards"], "task=vqa", *_vqa_files(tmp_path, [1, 57, 3]))
    assert sorted(ex.image_id for ex, _ in task.train_examples) == [1, 57]
    assert task.skipped["train_images"]["images_missing"] == 1
    with pytest.raises(
        ValueError,
        match=r"q\.json: 0 images found.*wanted key 'COCO_1' "
        r"\(vqa.key_format='COCO_\{image_id\}' for image_id 1\).*'coco1'",
    ):
        _task(
            tmp_path,
            [tmp_path / "shards"],
            "task=vqa",
            *_vqa_files(tmp_path, [1, 57]),
            "vqa.key_format=COCO_{image_id}",
        )


def test_nlvr2_defaults_find_image_only_shards(tmp_path):
    for name in ("dev-850-0-img0", "dev-850-0-img1", "dev-851-0-img0"):
        write_image(tmp_path / "dev" / f"{name}.jpg", "rgb").rename(tmp_path / "dev" / f"{name}.png")
    build_images(tmp_path / "shards", [tmp_path / "dev"], "nlvr2", **FAST)
    lines = [
        {"identifier": "dev-850-0-0", "sentence": "two dogs", "label": "True"},
        {"identifier": "dev-851-0-0", "sentence": "a cat", "label": "False"},
    ]  # img1 missing
    (tmp_path / "train.json").write_text("".join(json.dumps(line) + "\n" for line in lines))
    task = _task(tmp_path, [tmp_path / "shards"], "task=nlvr2", f"nlvr2.train={tmp_path / 'train.json'}")
    assert [ex.identifier for ex in task.train_examples] == ["dev-850-0-0"]
    with pytest.raises(ValueError, match=r"wanted key 'nlvr2-dev-850-0-img0'.*found keys like 'dev-850-0-img0'"):
        _task(
            tmp_path,
            [tmp_path / "shards"],
            "task=nlvr2",
            f"nlvr2.train={tmp_path / 'train.json'}",
            "nlvr2.key_format=nlvr2-{name}",
        )


@pytest.mark.parametrize(
    "task, setting", [("vqa", "vqa.image_map"), ("nlvr2", "nlvr2.image_map"), ("retrieval", "retrieval.karpathy")]
)
def test_missing_demo_task_files_name_the_command(tmp_path, task, setting):
    write_image(tmp_path / "dev" / "dev-1-0-img0.png", "rgb")
    build_images(tmp_path / "shards", [tmp_path / "dev"], "nlvr2", **FAST)
    files = {"vqa": _vqa_files(tmp_path, [1]), "nlvr2": [f"nlvr2.train={tmp_path / 'none.json'}"], "retrieval": []}[
        task
    ]
    with pytest.raises(FileNotFoundError, match=r"data/tasks/\w+/missing.json does not exist") as err:
        _task(tmp_path, [tmp_path / "shards"], f"task={task}", *files, f"{setting}=data/tasks/{task}/missing.json")
    assert MAKE_TASKS in str(err.value)
