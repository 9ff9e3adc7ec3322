"""Small fine-tuning tasks in the OFFICIAL formats, made from the synthetic shards.

Every synthetic image carries its ``objects`` ({shape, color, x, y, size}) and captions,
so questions, true/false sentences and retrieval sets can be generated with exact
answers. Writing them as VQA 2.0 / NLVR2 / Karpathy files means the fine-tuning scripts
run through the same readers as real data::

    python -m pixelbert_dist.finetune.synthetic_tasks --shards data/synthetic --out data/tasks

writes ``vqa/`` (questions + annotations per split, ``image_ids.json``: image_id -> shard
key), ``nlvr2/`` (``train.json``, ``dev.json``, ``test1.json`` and ``images.json``: image
name -> shard key), ``retrieval/dataset_synthetic.json`` (Karpathy form; ``filename`` is
``KEY.jpg``) and ``tasks.json`` (seed, shard folders, counts). One image split (train /
val / test, drawn from the seed) is shared by all tasks, so held-out images are never
trained on. Text uses only lower-case words of the synthetic vocabulary.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from pixelbert_dist.data.format.shards import MANIFEST, iter_samples
from pixelbert_dist.finetune.vqa_accuracy import normalize_answer

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
SPLITS = ("train", "val", "test")
NLVR2_SPLITS = {"train": "train", "val": "dev", "test": "test1"}


class SyntheticTasksError(ValueError):
    """Shards that cannot be turned into tasks (missing folder or metadata)."""


@dataclass
class SyntheticTasksConfig:
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    answer_noise: float = 0.1  # chance that each human answer is a wrong one
    word_answers: float = 0.2  # chance that a count is written as a word ("two")
    sentences_per_pair: int = 2  # NLVR2 sentences per image pair
    max_images: int | None = None


@dataclass(frozen=True)
class Scene:
    key: str
    objects: tuple[dict, ...]
    captions: tuple[str, ...]


# ---------------------------------------------------------------- reading the shards
def shard_dirs(path: str | Path) -> list[Path]:
    """``path`` itself when it holds a manifest, else its sub-folders that do (train/, val/)."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return [path]
    found = sorted(p for p in path.glob("*") if (p / MANIFEST).is_file()) if path.is_dir() else []
    if not found:
        raise SyntheticTasksError(f"{path}: no {MANIFEST} in it or in its sub-folders (not a shard directory)")
    return found


def _scene(key: str, meta: dict, where: Path) -> Scene:
    objects = meta.get("objects")
    if not isinstance(objects, list) or not objects:
        raise SyntheticTasksError(f"{where}: sample {key} has no 'objects' (synthetic shards only)")
    for obj in objects:
        if not isinstance(obj, dict) or not all(isinstance(obj.get(f), str) for f in ("shape", "color")):
            raise SyntheticTasksError(f"{where}: sample {key} has an object without shape/color")
    return Scene(key, tuple(objects), tuple(meta.get("captions") or ()))


def load_scenes(paths: Sequence[str | Path]) -> list[Scene]:
    scenes: dict[str, Scene] = {}
    for directory in [d for p in paths for d in shard_dirs(p)]:
        for key, _jpeg, meta in iter_samples(directory):
            if key in scenes:
                raise SyntheticTasksError(f"{directory}: sample key {key} appears twice")
            scenes[key] = _scene(key, meta, directory)
    return [scenes[k] for k in sorted(scenes)]


def split_scenes(scenes: list[Scene], cfg: SyntheticTasksConfig) -> dict[str, list[Scene]]:
    order = list(scenes)
    random.Random(f"{cfg.seed}:split").shuffle(order)
    if cfg.max_images is not None:
        order = order[: cfg.max_images]
    n_test = int(round(len(order) * cfg.test_fraction))
    n_val = int(round(len(order) * cfg.val_fraction))
    parts = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    return {name: sorted(parts[name], key=lambda s: s.key) for name in SPLITS}


# ---------------------------------------------------------------- words
def plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "sh", "ch")) else "s")


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def count(objects: Sequence[dict], shape: str | None = None, color: str | None = None) -> int:
    return sum(1 for o in objects if (shape is None or o["shape"] == shape) and (color is None or o["color"] == color))


# ---------------------------------------------------------------- VQA
def vqa_questions(
    scene: Scene, rng: random.Random, colors: list[str], shapes: list[str]
) -> list[tuple[str, str, str, str]]:
    """(question, answer, question_type, answer_type) about one scene."""
    objs, out = scene.objects, []
    unique = [o for o in objs if count(objs, shape=o["shape"]) == 1]
    if unique:
        obj = rng.choice(unique)
        out.append((f"what color is the {obj['shape']}?", obj["color"], "what color is the", "other"))
    present = sorted({o["shape"] for o in objs})
    shape = rng.choice(present if rng.random() < 0.7 else shapes)
    out.append((f"how many {plural(shape)} are there?", str(count(objs, shape=shape)), "how many", "number"))
    if rng.random() < 0.5:
        obj = rng.choice(objs)
        color, shape = obj["color"], obj["shape"]
    else:  # an absent pair, often sharing a colour or a shape with the scene (harder)
        absent = [(c, s) for c in colors for s in shapes if count(objs, s, c) == 0]
        color, shape = rng.choice(absent)
    answer = "yes" if count(objs, shape, color) else "no"
    out.append((f"is there {article(color)} {color} {shape}?", answer, "is there a", "yes/no"))
    return out


def human_answers(
    answer: str, answer_type: str, rng: random.Random, cfg: SyntheticTasksConfig, colors: list[str]
) -> list[dict]:
    """Ten answers in the official form: mostly right, some wrong, counts sometimes as words."""
    wrong = {
        "other": [c for c in colors if c != answer],
        "number": [str(n) for n in range(5) if str(n) != answer],
        "yes/no": ["no" if answer == "yes" else "yes"],
    }[answer_type]
    answers = []
    for i in range(10):
        text, confident = answer, "yes"
        if rng.random() < cfg.answer_noise:
            text, confident = rng.choice(wrong), "maybe"
        if answer_type == "number" and rng.random() < cfg.word_answers:
            text = NUMBER_WORDS[int(text)]
        answers.append({"answer": text, "answer_confidence": confident, "answer_id": i + 1})
    return answers


def _mode(answers: list[dict]) -> str:
    counts = Counter(normalize_answer(a["answer"]) for a in answers)
    return min(counts, key=lambda a: (-counts[a], a))


def write_vqa(
    out: Path, splits: dict[str, list[Scene]], cfg: SyntheticTasksConfig, colors: list[str], shapes: list[str]
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    all_keys = sorted(s.key for scenes in splits.values() for s in scenes)
    image_ids = {key: i + 1 for i, key in enumerate(all_keys)}
    counts = {}
    for split, scenes in splits.items():
        questions, annotations = [], []
        for scene in scenes:
            rng = random.Random(f"{cfg.seed}:vqa:{scene.key}")
            image_id = image_ids[scene.key]
            for j, (question, answer, qtype, atype) in enumerate(vqa_questions(scene, rng, colors, shapes)):
                qid = image_id * 10 + j
                answers = human_answers(answer, atype, rng, cfg, colors)
                questions.append({"image_id": image_id, "question": question, "question_id": qid})
                annotations.append(
                    {
                        "question_id": qid,
                        "image_id": image_id,
                        "question_type": qtype,
                        "answer_type": atype,
                        "multiple_choice_answer": _mode(answers),
                        "answers": answers,
                    }
                )
        header = {
            "info": {"description": "synthetic shapes VQA"},
            "license": {},
            "data_type": "synthetic",
            "data_subtype": split,
        }
        _dump(
            out / f"v2_OpenEnded_mscoco_{split}_questions.json",
            {**header, "task_type": "Open-Ended", "questions": questions},
        )
        _dump(out / f"v2_mscoco_{split}_annotations.json", {**header, "annotations": annotations})
        counts[split] = len(questions)
    _dump(out / "image_ids.json", {str(i): key for key, i in image_ids.items()})
    return counts


# ---------------------------------------------------------------- NLVR2
def _nlvr2_template(rng: random.Random, left: Scene, right: Scene, colors, shapes):
    """A random sentence and a function (left_objects, right_objects) -> truth."""
    seen = [o for s in (left, right) for o in s.objects]
    pick = rng.choice(seen) if rng.random() < 0.7 else {"shape": rng.choice(shapes), "color": rng.choice(colors)}
    shape, color = pick["shape"], pick["color"]
    kind = rng.randrange(8)
    if kind == 0:
        return (
            f"the left image has more {plural(shape)} than the right image",
            lambda a, b: count(a, shape) > count(b, shape),
        )
    if kind == 1:
        return (
            f"the right image has more {plural(shape)} than the left image",
            lambda a, b: count(b, shape) > count(a, shape),
        )
    if kind == 2:
        return (
            f"each image contains {article(color)} {color} shape",
            lambda a, b: count(a, color=color) > 0 and count(b, color=color) > 0,
        )
    if kind == 3:
        return ("there are more shapes in the left image than in the right image", lambda a, b: len(a) > len(b))
    if kind == 6:
        return (
            f"each image contains {article(shape)} {shape}",
            lambda a, b: count(a, shape) > 0 and count(b, shape) > 0,
        )
    if kind == 7:  # true of a pair and of its swap alike: lets both halves be True
        return (
            f"an image contains {article(color)} {color} {shape}",
            lambda a, b: count(a, shape, color) + count(b, shape, color) > 0,
        )
    side = "left" if kind == 4 else "right"
    return (
        f"the {side} image contains {article(color)} {color} {shape}",
        lambda a, b: count(a if side == "left" else b, shape, color) > 0,
    )


def nlvr2_sentence(rng: random.Random, left: Scene, right: Scene, want: tuple[bool, bool], colors, shapes):
    """A sentence and its truth function, drawn so that its truth about (left, right) and
    about the swapped pair is ``want`` when a few tries find one (else at least the first
    half of ``want``): without this, swapped pairs would come out mostly False."""
    fallback = None
    for _ in range(60):
        sentence, truth = _nlvr2_template(rng, left, right, colors, shapes)
        got = (truth(left.objects, right.objects), truth(right.objects, left.objects))
        if got == want:
            return sentence, truth
        if fallback is None and got[0] == want[0]:
            fallback = (sentence, truth)
    return fallback or (sentence, truth)


def write_nlvr2(
    out: Path, splits: dict[str, list[Scene]], cfg: SyntheticTasksConfig, colors: list[str], shapes: list[str]
) -> dict:
    """Image sets of two scenes A, B; pair 0 shows (A, B), pair 1 (B, A), and every
    sentence is asked about both pairs, so the official consistency metric means something."""
    out.mkdir(parents=True, exist_ok=True)
    images, counts = {}, {}
    for split, scenes in splits.items():
        name, rng = NLVR2_SPLITS[split], random.Random(f"{cfg.seed}:nlvr2:{split}")
        order = list(scenes)
        rng.shuffle(order)
        lines = []
        for set_id in range(len(order) // 2):
            a, b = order[2 * set_id], order[2 * set_id + 1]
            for pair_id, (left, right) in enumerate(((a, b), (b, a))):
                images[f"{name}-{set_id}-{pair_id}-img0"] = left.key
                images[f"{name}-{set_id}-{pair_id}-img1"] = right.key
            for sent_id in range(cfg.sentences_per_pair):
                sentence, truth = nlvr2_sentence(rng, a, b, (rng.random() < 0.5, rng.random() < 0.5), colors, shapes)
                for pair_id, (left, right) in enumerate(((a, b), (b, a))):
                    lines.append(
                        {
                            "identifier": f"{name}-{set_id}-{pair_id}-{sent_id}",
                            "sentence": sentence,
                            "label": str(truth(left.objects, right.objects)),
                            "left_url": f"synthetic:{left.key}",
                            "right_url": f"synthetic:{right.key}",
                            "synset": "synthetic shapes",
                            "query": f"shapes {set_id}",
                            "writer": "generator",
                        }
                    )
        (out / f"{name}.json").write_text("".join(json.dumps(line) + "\n" for line in lines))
        counts[name] = len(lines)
    _dump(out / "images.json", images)
    return counts


# ---------------------------------------------------------------- retrieval
def write_retrieval(out: Path, splits: dict[str, list[Scene]]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    images, counts, sentid = [], {}, 0
    all_scenes = sorted((s for scenes in splits.values() for s in scenes), key=lambda s: s.key)
    split_of = {s.key: name for name, scenes in splits.items() for s in scenes}
    for imgid, scene in enumerate(all_scenes):
        sentences = []
        for raw in scene.captions:
            sentences.append(
                {"tokens": re.findall(r"[a-z0-9]+", raw.lower()), "raw": raw, "imgid": imgid, "sentid": sentid}
            )
            sentid += 1
        if not sentences:
            continue
        images.append(
            {
                "filename": f"{scene.key}.jpg",
                "imgid": imgid,
                "split": split_of[scene.key],
                "sentids": [s["sentid"] for s in sentences],
                "sentences": sentences,
            }
        )
        counts[split_of[scene.key]] = counts.get(split_of[scene.key], 0) + 1
    _dump(out / "dataset_synthetic.json", {"images": images, "dataset": "synthetic"})
    return counts


# ---------------------------------------------------------------- driver
def blind_baselines(out: Path) -> dict:
    """What answering without the image gets on the held-out split, the bar a fine-tuned
    model must clear: VQA with the most frequent train answer of each question type,
    NLVR2 with the majority train label (both through the official metrics)."""
    from pixelbert_dist.finetune.nlvr2_data import evaluate_nlvr2, read_nlvr2
    from pixelbert_dist.finetune.vqa_data import evaluate_vqa, read_vqa

    def vqa(split):
        return read_vqa(
            out / "vqa" / f"v2_OpenEnded_mscoco_{split}_questions.json",
            out / "vqa" / f"v2_mscoco_{split}_annotations.json",
        )

    by_type: dict[str, Counter] = {}
    for ex in vqa("train"):
        by_type.setdefault(ex.question_type, Counter())[ex.multiple_choice_answer] += 1
    val = vqa("val")
    guess = {ex.question_id: by_type.get(ex.question_type, Counter({"yes": 1})).most_common(1)[0][0] for ex in val}
    train_labels = Counter(ex.label for ex in read_nlvr2(out / "nlvr2" / "train.json"))
    dev = read_nlvr2(out / "nlvr2" / "dev.json")
    majority = train_labels.most_common(1)[0][0]
    return {
        "vqa_val_blind": evaluate_vqa(guess, val)["overall"] if val else None,
        "nlvr2_dev_majority": evaluate_nlvr2({e.identifier: majority for e in dev}, dev)["accuracy"] if dev else None,
    }


def _dump(path: Path, data) -> None:
    path.write_text(json.dumps(data))


def generate_tasks(shards: Sequence[str | Path], out_dir: str | Path, cfg: SyntheticTasksConfig | None = None) -> dict:
    """Write all three tasks under ``out_dir``; returns (and writes) the summary."""
    cfg = cfg or SyntheticTasksConfig()
    scenes = load_scenes(shards)
    if len(scenes) < 6:
        raise SyntheticTasksError(f"{list(shards)}: {len(scenes)} samples, need at least 6")
    splits = split_scenes(scenes, cfg)
    colors = sorted({o["color"] for s in scenes for o in s.objects})
    shapes = sorted({o["shape"] for s in scenes for o in s.objects})
    out = Path(out_dir)
    summary = {
        "config": asdict(cfg),
        "shards": [str(d.resolve()) for p in shards for d in shard_dirs(p)],
        "images": {k: len(v) for k, v in splits.items()},
        "vqa_questions": write_vqa(out / "vqa", splits, cfg, colors, shapes),
        "nlvr2_examples": write_nlvr2(out / "nlvr2", splits, cfg, colors, shapes),
        "retrieval_images": write_retrieval(out / "retrieval", splits),
    }
    summary["baselines"] = blind_baselines(out)
    (out / "tasks.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shards",
        nargs="+",
        required=True,
        help="synthetic shard folder(s): a split folder or one holding train/ val/",
    )
    parser.add_argument("--out", required=True, help="output folder for vqa/ nlvr2/ retrieval/")
    defaults = SyntheticTasksConfig()
    for name, value in asdict(defaults).items():
        kind = int if name in ("seed", "sentences_per_pair", "max_images") else float
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value)
    args = vars(parser.parse_args(argv))
    shards, out = args.pop("shards"), args.pop("out")
    summary = generate_tasks(shards, out, SyntheticTasksConfig(**args))
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=1))
    return summary


if __name__ == "__main__":
    main()
