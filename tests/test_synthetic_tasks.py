"""Synthetic fine-tuning tasks: deterministic, true to the scenes, readable by the readers."""

import json
import re
from pathlib import Path

import pytest

from pixelbert_dist.data.builders.synthetic import SHAPES, build_synthetic
from pixelbert_dist.data.format.shards import iter_samples
from pixelbert_dist.finetune.nlvr2_data import read_nlvr2
from pixelbert_dist.finetune.retrieval_metrics import read_karpathy_split
from pixelbert_dist.finetune.synthetic_tasks import SyntheticTasksConfig, SyntheticTasksError, generate_tasks, main
from pixelbert_dist.finetune.vqa_accuracy import vqa_accuracy
from pixelbert_dist.finetune.vqa_data import evaluate_vqa, read_vqa

VOCAB = Path(__file__).resolve().parents[1] / "pixelbert_dist/assets/vocab_synthetic/vocab.txt"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    build_synthetic(out, 40, seed=3, val_fraction=0.2, min_size=32, max_size=48, progress=False)
    return out


@pytest.fixture(scope="module")
def tasks(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("tasks")
    summary = main(["--shards", str(shards), "--out", str(out), "--seed", "5"])
    return out, summary


@pytest.fixture(scope="module")
def scenes(shards):
    return {key: meta["objects"] for split in ("train", "val") for key, _, meta in iter_samples(shards / split)}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_under_a_seed(shards, tasks, tmp_path):
    out, summary = tasks
    again = generate_tasks([shards], tmp_path / "a", SyntheticTasksConfig(seed=5))
    assert _files(tmp_path / "a") == _files(out)
    assert summary["images"] == {"train": 28, "val": 6, "test": 6} == again["images"]
    generate_tasks([shards], tmp_path / "b", SyntheticTasksConfig(seed=6))
    assert _files(tmp_path / "b") != _files(out)


def _singular(plural):
    (shape,) = [s for s in SHAPES if plural in (s + "s", s + "es")]
    return shape


def _count(objects, shape=None, color=None):
    return sum(1 for o in objects if shape in (None, o["shape"]) and color in (None, o["color"]))


def _true_answer(question, objects):
    if m := re.fullmatch(r"what color is the (\w+)\?", question):
        (obj,) = [o for o in objects if o["shape"] == m[1]]  # asked only of a unique shape
        return obj["color"]
    if m := re.fullmatch(r"how many (\w+) are there\?", question):
        return str(_count(objects, shape=_singular(m[1])))
    m = re.fullmatch(r"is there an? (\w+) (\w+)\?", question)
    return "yes" if _count(objects, m[2], m[1]) else "no"


def test_vqa_answers_follow_the_objects(tasks, scenes):
    out, _ = tasks
    keys = json.loads((out / "vqa/image_ids.json").read_text())
    seen_types = set()
    for split in ("train", "val", "test"):
        examples = read_vqa(
            out / f"vqa/v2_OpenEnded_mscoco_{split}_questions.json", out / f"vqa/v2_mscoco_{split}_annotations.json"
        )
        assert examples
        for ex in examples:
            truth = _true_answer(ex.question, scenes[keys[str(ex.image_id)]])
            assert ex.multiple_choice_answer == truth, ex
            assert len(ex.answers) == 10
            assert vqa_accuracy(truth, ex.answers) >= 0.9
            seen_types.add(ex.answer_type)
        # the oracle answers score 100.0 under the official master rules (the 2016 rule never
        # digit-cleans the humans: a "3" against "three"s falls short)
        oracle = evaluate_vqa({ex.question_id: ex.multiple_choice_answer for ex in examples}, examples)
        assert oracle["overall"] == 100.0, split
    assert seen_types == {"yes/no", "number", "other"}


def _true_sentence(sentence, left, right):
    if m := re.fullmatch(r"the (left|right) image has more (\w+) than the (left|right) image", sentence):
        a, b = (left, right) if m[1] == "left" else (right, left)
        return _count(a, _singular(m[2])) > _count(b, _singular(m[2]))
    if m := re.fullmatch(r"each image contains an? (\w+) shape", sentence):
        return _count(left, color=m[1]) > 0 and _count(right, color=m[1]) > 0
    if m := re.fullmatch(r"each image contains an? (\w+)", sentence):
        return _count(left, m[1]) > 0 and _count(right, m[1]) > 0
    if sentence == "there are more shapes in the left image than in the right image":
        return len(left) > len(right)
    if m := re.fullmatch(r"an image contains an? (\w+) (\w+)", sentence):
        return _count(left, m[2], m[1]) + _count(right, m[2], m[1]) > 0
    m = re.fullmatch(r"the (left|right) image contains an? (\w+) (\w+)", sentence)
    return _count(left if m[1] == "left" else right, m[3], m[2]) > 0


def test_nlvr2_labels_follow_the_objects(tasks, scenes):
    out, _ = tasks
    images = json.loads((out / "nlvr2/images.json").read_text())
    labels = []
    for name in ("train", "dev", "test1"):
        for ex in read_nlvr2(out / f"nlvr2/{name}.json"):
            assert ex.identifier.startswith(name + "-")
            left, right = scenes[images[ex.left_image]], scenes[images[ex.right_image]]
            assert ex.label == _true_sentence(ex.sentence, left, right), ex
            labels.append(ex.label)
    assert 0.35 < sum(labels) / len(labels) < 0.65  # balanced, not a majority-class task


def test_one_image_split_shared_by_all_tasks(tasks, scenes):
    out, _ = tasks
    vqa_keys = json.loads((out / "vqa/image_ids.json").read_text())
    nlvr_keys = json.loads((out / "nlvr2/images.json").read_text())
    karpathy = out / "retrieval/dataset_synthetic.json"
    by_split = {}
    for split, nlvr_name in (("train", "train"), ("val", "dev"), ("test", "test1")):
        images = read_karpathy_split(karpathy, split)
        keys = {im.filename.removesuffix(".jpg") for im in images}
        for im in images:
            assert len(im.captions) >= 1
            assert im.filepath is None
        vqa = read_vqa(out / f"vqa/v2_OpenEnded_mscoco_{split}_questions.json")
        assert {vqa_keys[str(ex.image_id)] for ex in vqa} == keys
        assert {nlvr_keys[k] for k in nlvr_keys if k.startswith(nlvr_name + "-")} <= keys
        by_split[split] = keys
    assert sum(len(k) for k in by_split.values()) == len(scenes) == len(set().union(*by_split.values()))


def test_generated_words_are_in_the_synthetic_vocab(tasks):
    out, _ = tasks
    vocab = set(VOCAB.read_text().split())
    texts = [
        json.loads(line)["sentence"]
        for name in ("train", "dev", "test1")
        for line in (out / f"nlvr2/{name}.json").read_text().splitlines()
    ]
    for split in ("train", "val", "test"):
        data = json.loads((out / f"vqa/v2_OpenEnded_mscoco_{split}_questions.json").read_text())
        texts += [q["question"] for q in data["questions"]]
    words = {w for t in texts for w in re.findall(r"\w+|[^\w\s]", t)}
    assert words - vocab == set()
    assert all(t == t.lower() for t in texts)


def test_summary_and_errors(tasks, tmp_path):
    out, summary = tasks
    assert json.loads((out / "tasks.json").read_text()) == summary
    assert set(summary["baselines"]) == {"vqa_val_blind", "nlvr2_dev_majority"}
    with pytest.raises(SyntheticTasksError, match="not a shard directory"):
        generate_tasks([tmp_path], tmp_path / "x")
