"""VQA 2.0: readers of the official files, the answer vocabulary, soft targets, the
submission file and the evaluation (the accuracy rules live in ``vqa_accuracy.py``).

``evaluate_vqa`` reports what the official ``vqaEval.py`` prints: percentages rounded to
2 decimals (overall, per answer type, per question type), with the unrounded values
beside them. Which version of the official rules applies is the ``rule`` argument
(``vqa_accuracy.ACCURACY_RULES``; default: master since 2021).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from pixelbert_dist.data.builders.common import load_json
from pixelbert_dist.finetune.vqa_accuracy import normalize_answer, reported, vqa_accuracy


def answer_score(count: int, num_answers: int = 10) -> float:
    """The accuracy of an answer given by ``count`` of ``num_answers`` humans, averaged
    over the leave-one-out subsets exactly as the metric does. With ten answers this is
    the familiar table 0, 0.3, 0.6, 0.9, 1.0 for 0, 1, 2, 3, >=4 matches."""
    if num_answers <= 0 or not 0 <= count <= num_answers:
        raise ValueError(f"answer_score: bad count {count} of {num_answers}")
    hit = count * min(1.0, (count - 1) / 3.0) if count else 0.0
    miss = (num_answers - count) * min(1.0, count / 3.0)
    return (hit + miss) / num_answers


# ---------------------------------------------------------------- official file readers
class VqaFormatError(ValueError):
    """An official VQA file that cannot be read, naming the file and the question."""


@dataclass(frozen=True)
class VqaExample:
    question_id: int
    image_id: int
    question: str
    answers: tuple[str, ...] = ()  # the human answers as written; () on test splits
    multiple_choice_answer: str | None = None
    answer_type: str | None = None  # "yes/no", "number", "other"
    question_type: str | None = None  # e.g. "what color is the"


def _load_list(path: Path, key: str) -> list:
    data = load_json(path, VqaFormatError)
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise VqaFormatError(f"{path}: expected a JSON object with a '{key}' list (the official VQA 2.0 format)")
    return data[key]


def _field(entry, name: str, kind: type, where: str):
    value = entry.get(name) if isinstance(entry, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise VqaFormatError(f"{where}: '{name}' must be {kind.__name__}, got {value!r}")
    return value


def _read_questions(path: Path) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for i, entry in enumerate(_load_list(path, "questions")):
        qid = entry.get("question_id") if isinstance(entry, dict) else None
        where = f"{path}: question #{i} (question_id={qid})"
        qid = _field(entry, "question_id", int, where)
        if qid in out:
            raise VqaFormatError(f"{where}: duplicate question_id")
        out[qid] = {
            "image_id": _field(entry, "image_id", int, where),
            "question": _field(entry, "question", str, where),
        }
    return out


def _read_annotation(entry, where: str) -> dict:
    answers = entry.get("answers")
    if not isinstance(answers, list) or not answers:
        raise VqaFormatError(f"{where}: 'answers' must be a non-empty list")
    texts = tuple(_field(a, "answer", str, f"{where}, answer #{j}") for j, a in enumerate(answers))
    extra = {}
    for name in ("multiple_choice_answer", "answer_type", "question_type"):
        if entry.get(name) is not None:
            extra[name] = _field(entry, name, str, where)
    return {"answers": texts, "image_id": _field(entry, "image_id", int, where), **extra}


def read_vqa(questions_json: str | Path, annotations_json: str | Path | None = None) -> list[VqaExample]:
    """Examples from ``v2_OpenEnded_mscoco_*_questions.json`` and, where the split has
    them, ``v2_mscoco_*_annotations.json``, in the order of the questions file."""
    qpath = Path(questions_json)
    questions = _read_questions(qpath)
    if annotations_json is None:
        return [VqaExample(qid, q["image_id"], q["question"]) for qid, q in questions.items()]
    apath = Path(annotations_json)
    annotations: dict[int, dict] = {}
    for i, entry in enumerate(_load_list(apath, "annotations")):
        qid = entry.get("question_id") if isinstance(entry, dict) else None
        where = f"{apath}: annotation #{i} (question_id={qid})"
        qid = _field(entry, "question_id", int, where)
        if qid not in questions:
            raise VqaFormatError(f"{where}: no such question in {qpath}")
        if qid in annotations:
            raise VqaFormatError(f"{where}: duplicate annotation")
        ann = _read_annotation(entry, where)
        if ann.pop("image_id") != questions[qid]["image_id"]:
            raise VqaFormatError(f"{where}: image_id differs from the one in {qpath}")
        annotations[qid] = ann
    missing = [qid for qid in questions if qid not in annotations]
    if missing:
        raise VqaFormatError(
            f"{apath}: no annotation for {len(missing)} question(s) of {qpath}, e.g. question_id={missing[0]}"
        )
    return [VqaExample(qid, q["image_id"], q["question"], **annotations[qid]) for qid, q in questions.items()]


def drop_missing_images(
    examples: Sequence[VqaExample], available_image_ids: Iterable[int]
) -> tuple[list[VqaExample], dict]:
    """Keep the questions whose image is available; count the rest (never drop silently:
    the counts belong in the results file)."""
    available = set(available_image_ids)
    kept = [ex for ex in examples if ex.image_id in available]
    missing = sorted({ex.image_id for ex in examples} - available)
    return kept, {
        "questions_missing_image": len(examples) - len(kept),
        "images_missing": len(missing),
        "example_missing_image_ids": missing[:5],
    }


def coco_image_name(image_id: int, subset: str) -> str:
    """The COCO file stem VQA 2.0 refers to, e.g. ``COCO_val2014_000000000042``."""
    return f"COCO_{subset}_{image_id:012d}"


# ---------------------------------------------------------------- vocabulary and targets
@dataclass(frozen=True)
class AnswerVocab:
    """Normalised answers; the classifier's output ``i`` means ``answers[i]``."""

    answers: tuple[str, ...]

    def __post_init__(self):
        if len(set(self.answers)) != len(self.answers):
            raise ValueError("AnswerVocab: answers must be unique")
        object.__setattr__(self, "_index", {a: i for i, a in enumerate(self.answers)})

    def __len__(self) -> int:
        return len(self.answers)

    def __contains__(self, answer: str) -> bool:
        return normalize_answer(answer) in self._index

    def index(self, answer: str) -> int | None:
        """Index of an answer (normalised first), None when outside the vocabulary."""
        return self._index.get(normalize_answer(answer))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"answers": list(self.answers)}, indent=0) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "AnswerVocab":
        answers = _load_list(Path(path), "answers")
        if not all(isinstance(a, str) for a in answers):
            raise VqaFormatError(f"{path}: 'answers' must be a list of strings")
        return cls(tuple(answers))


def _label_answer(ex: VqaExample) -> str:
    """The answer an example votes for: its multiple-choice answer (the one most humans
    gave), else the most common of its answers (ties: alphabetical)."""
    if ex.multiple_choice_answer is not None:
        return normalize_answer(ex.multiple_choice_answer)
    counts = Counter(normalize_answer(a) for a in ex.answers)
    return min(counts, key=lambda a: (-counts[a], a))


def build_answer_vocab(examples: Iterable[VqaExample], size: int = 3129) -> AnswerVocab:
    """The ``size`` most frequent normalised answers (each question votes once, for its
    multiple-choice answer, as the usual 3129-answer VQA 2.0 vocabulary is built).
    Ties are broken alphabetically so the vocabulary never depends on file order."""
    counts = Counter(_label_answer(ex) for ex in examples if ex.answers)
    counts.pop("", None)  # an answer made only of articles/punctuation
    if not counts:
        raise ValueError("build_answer_vocab: no answered examples (a test split?)")
    ranked = sorted(counts, key=lambda a: (-counts[a], a))
    return AnswerVocab(tuple(ranked[:size]))


class SoftTarget(NamedTuple):
    indices: tuple[int, ...]  # vocabulary indices with a non-zero score, ascending
    scores: tuple[float, ...]  # answer_score() of each
    num_answers: int  # human answers in all
    num_oov: int  # human answers outside the vocabulary

    @property
    def all_oov(self) -> bool:
        return not self.indices

    def dense(self, num_classes: int) -> np.ndarray:
        out = np.zeros(num_classes, dtype=np.float32)
        out[list(self.indices)] = self.scores
        return out


def soft_targets(answers: Sequence[str], vocab: AnswerVocab) -> SoftTarget:
    """Soft score per vocabulary answer: its exact VQA accuracy (``answer_score``), so the
    BCE target is what the metric would pay for predicting that answer."""
    if not answers:
        raise ValueError("soft_targets needs the human answers (none given)")
    counts = Counter(normalize_answer(a) for a in answers)
    pairs, oov = [], 0
    for answer, count in counts.items():
        idx = vocab._index.get(answer)
        if idx is None:
            oov += count
        else:
            pairs.append((idx, answer_score(count, len(answers))))
    pairs.sort()
    return SoftTarget(tuple(i for i, _ in pairs), tuple(s for _, s in pairs), len(answers), oov)


def build_targets(
    examples: Sequence[VqaExample], vocab: AnswerVocab, training: bool
) -> tuple[list[tuple[VqaExample, SoftTarget]], dict]:
    """Pair examples with their soft targets and count what falls outside the vocabulary.

    In training a question whose answers are all out of vocabulary teaches nothing and is
    skipped (counted); in evaluation it is kept, and scores 0 as it would officially."""
    kept, skipped, total, oov = [], 0, 0, 0
    for ex in examples:
        if not ex.answers:
            raise VqaFormatError(f"question_id={ex.question_id} has no answers (test split?)")
        target = soft_targets(ex.answers, vocab)
        total, oov = total + target.num_answers, oov + target.num_oov
        if training and target.all_oov:
            skipped += 1
            continue
        kept.append((ex, target))
    stats = {
        "questions": len(examples),
        "kept": len(kept),
        "skipped_all_oov": skipped,
        "answers": total,
        "answers_oov": oov,
        "oov_rate": oov / total if total else 0.0,
    }
    return kept, stats


# ---------------------------------------------------------------- results and evaluation
def _as_mapping(predictions) -> dict[int, str]:
    if isinstance(predictions, Mapping):
        items = list(predictions.items())
    else:
        items = []
        for i, p in enumerate(predictions):
            if not isinstance(p, Mapping) or "question_id" not in p or "answer" not in p:
                raise ValueError(f"prediction #{i} must be a dict with 'question_id' and 'answer'")
            items.append((p["question_id"], p["answer"]))
    out: dict[int, str] = {}
    for qid, ans in items:
        if not isinstance(qid, int) or isinstance(qid, bool) or not isinstance(ans, str):
            raise ValueError(f"prediction for question_id={qid!r}: need an int id and a str answer")
        if qid in out:
            raise ValueError(f"question_id={qid} is predicted twice")
        out[qid] = ans
    return out


def _check_coverage(preds: Mapping[int, str], question_ids: Iterable[int]) -> None:
    wanted = set(question_ids)
    missing = sorted(wanted - set(preds))
    extra = sorted(set(preds) - wanted)
    if missing or extra:
        raise ValueError(
            f"predictions do not match the questions: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(extra)} unknown (e.g. {extra[:3]})"
        )


def write_vqa_results(path: str | Path, predictions, question_ids: Iterable[int] | None = None) -> Path:
    """Write ``[{"question_id": int, "answer": str}, ...]``, the official submission form.
    With ``question_ids`` every one must be answered, as the evaluation server requires."""
    preds = _as_mapping(predictions)
    if question_ids is not None:
        _check_coverage(preds, question_ids)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps([{"question_id": q, "answer": a} for q, a in preds.items()]))
    os.replace(tmp, path)
    return path


def read_vqa_results(path: str | Path) -> dict[int, str]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise VqaFormatError(f"{path}: cannot read results ({err})") from None
    if not isinstance(data, list):
        raise VqaFormatError(f"{path}: results must be a JSON list of {{question_id, answer}}")
    try:
        return _as_mapping(data)
    except ValueError as err:
        raise VqaFormatError(f"{path}: {err}") from None


def evaluate_vqa(predictions, examples: Sequence[VqaExample], rule: str = "official") -> dict:
    """Accuracy in percent as the official script reports it (rounded to 2 decimals):
    overall, per answer type and per question type; ``unrounded`` holds the same numbers
    before rounding. Every question must be predicted."""
    preds = _as_mapping(predictions)
    _check_coverage(preds, (ex.question_id for ex in examples))
    per_answer: dict[str, list[float]] = {}
    per_question: dict[str, list[float]] = {}
    scores = []
    for ex in examples:
        if not ex.answers:
            raise VqaFormatError(f"question_id={ex.question_id} has no answers to evaluate against")
        acc = vqa_accuracy(preds[ex.question_id], ex.answers, rule)
        scores.append(acc)
        per_answer.setdefault(ex.answer_type or "unknown", []).append(acc)
        per_question.setdefault(ex.question_type or "unknown", []).append(acc)

    def pct(values):  # the official order of operations: 100 * sum / n
        return 100.0 * float(sum(values)) / len(values)

    unrounded = {
        "overall": pct(scores) if scores else 0.0,
        "per_answer_type": {k: pct(v) for k, v in sorted(per_answer.items())},
        "per_question_type": {k: pct(v) for k, v in sorted(per_question.items())},
    }
    return {
        "overall": reported(unrounded["overall"]),
        "num_questions": len(scores),
        "per_answer_type": {k: reported(v) for k, v in unrounded["per_answer_type"].items()},
        "per_question_type": {k: reported(v) for k, v in unrounded["per_question_type"].items()},
        "rule": rule,
        "unrounded": unrounded,
    }
