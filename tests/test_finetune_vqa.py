"""VQA 2.0: official normalisation, accuracy (master and the 2016 rule), vocabulary, soft
targets, readers, results. The generated comparison against an independent implementation
of the official master rules is in tests/test_vqa_official.py."""

import json

import pytest

from pixelbert_dist.finetune.vqa_accuracy import normalize_answer, process_punctuation, vqa_accuracy
from pixelbert_dist.finetune.vqa_data import (
    AnswerVocab,
    VqaExample,
    VqaFormatError,
    answer_score,
    build_answer_vocab,
    build_targets,
    coco_image_name,
    drop_missing_images,
    evaluate_vqa,
    read_vqa,
    read_vqa_results,
    soft_targets,
    write_vqa_results,
)


# ---------------------------------------------------------------- normalisation
@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two", "2"),
        ("TEN", "10"),
        ("none", "0"),
        ("zero", "0"),  # number words
        ("the dog.", "dog"),
        ("A dog", "dog"),
        ("an apple", "apple"),  # articles, trailing period
        ("isnt", "isn't"),
        ("dont", "don't"),
        ("isn't", "isn't"),  # contractions restored
        ("yes!", "yes"),
        ("Yes.", "yes"),
        ("no?", "no"),
        ("3.5", "3.5"),  # a period before a digit survives
        ("1,000", "1000"),  # digit,digit anywhere: every mark is deleted, not spaced
        ("hot-dog", "hot dog"),  # a mark between letters becomes a space
        ("hot - dog", "hot dog"),  # a mark next to a space is deleted
        ("  red\tand\nwhite ", "red and white"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_punctuation_rules_are_per_mark_and_look_at_the_input():
    # "," sits before a space -> deleted; "-" has no space around it -> becomes a space.
    assert process_punctuation("red, blue-green") == "red blue green"
    # Once the input holds digit,digit every mark is deleted outright.
    assert process_punctuation("1,5-6") == "156"
    # Periods: only the ones before a digit survive (the official look-ahead).
    assert process_punctuation("e.g. 2.5.") == "eg 2.5"


# ---------------------------------------------------------------- accuracy
def _answers(match: int, other: str = "cat") -> list[str]:
    return ["dog"] * match + [other] * (10 - match)


@pytest.mark.parametrize(
    "matches, expected",
    [
        # m matches: m leave-one-out sets hold m-1 matches, 10-m hold m; each scores min(1, k/3).
        (0, 0.0),
        (1, (1 * 0 + 9 * (1 / 3)) / 10),  # 0.3
        (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),  # 0.6
        (3, (3 * (2 / 3) + 7 * 1) / 10),  # 0.9
        (4, (4 * 1 + 6 * 1) / 10),  # 1.0
        (10, 1.0),
    ],
)
def test_vqa_accuracy_leave_one_out(matches, expected):
    assert vqa_accuracy("dog", _answers(matches)) == pytest.approx(expected)
    assert answer_score(matches) == pytest.approx(expected)


def test_table_values():
    assert [round(answer_score(m), 6) for m in range(6)] == [0, 0.3, 0.6, 0.9, 1, 1]
    # Fewer than ten answers: 2 of 3 -> sets {1 match, 1 match, 2 matches} -> (1/3+1/3+2/3)/3.
    assert answer_score(2, 3) == pytest.approx((1 / 3 + 1 / 3 + 2 / 3) / 3)


def test_official_master_cases_of_the_issue():
    # Humans agree: the prediction is compared as written (only whitespace is trimmed).
    assert vqa_accuracy("isnt", ["isn't"] * 10) == 0.0
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    assert vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0
    # Humans disagree: both sides cleaned fully, so "two" counts as "2".
    assert vqa_accuracy("2", ["two"] * 4 + ["3"] * 6) == 1.0
    assert vqa_accuracy("Two.", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("The dog!", _answers(2)) == pytest.approx(0.6)
    assert vqa_accuracy("dog", ["dog."] * 2 + ["cat"] * 8) == pytest.approx(0.6)
    # Whitespace is trimmed before the humans are compared: "red\t" and "red" agree.
    assert vqa_accuracy("Red", ["red\t"] * 5 + ["red"] * 5) == 0.0
    with pytest.raises(ValueError):
        vqa_accuracy("dog", [])
    with pytest.raises(ValueError, match="legacy-2016"):
        vqa_accuracy("dog", ["dog"], rule="2016")


def test_the_2016_rule_stays_available_by_name():
    legacy = "legacy-2016"
    assert vqa_accuracy("isnt", ["isn't"] * 10, legacy) == 1.0
    assert vqa_accuracy("Yes", ["yes"] * 10, legacy) == 1.0
    assert vqa_accuracy("2", ["two"] * 4 + ["3"] * 6, legacy) == 0.0  # humans never digit-cleaned
    assert vqa_accuracy("dog", ["dog."] * 2 + ["cat"] * 8, legacy) == pytest.approx(0.6)


# ---------------------------------------------------------------- vocabulary and targets
def _ex(qid, mc, answers=None, atype="other", qtype="what is"):
    return VqaExample(qid, 100 + qid, "what is it?", tuple(answers or [mc] * 10), mc, atype, qtype)


def test_vocab_top_k_with_ties_broken_alphabetically():
    examples = [
        _ex(1, "Yes"),
        _ex(2, "yes"),
        _ex(3, "yes."),
        _ex(4, "two"),
        _ex(5, "2"),
        _ex(6, "red"),
        _ex(7, "blue"),
        _ex(8, "cat"),
        VqaExample(9, 9, "q?"),
    ]  # unanswered (test split): ignored
    vocab = build_answer_vocab(examples, size=3)
    # yes: 3 votes, 2: 2 votes, then blue/cat/red tie at 1 -> "blue" wins alphabetically.
    assert vocab.answers == ("yes", "2", "blue")
    assert build_answer_vocab(list(reversed(examples)), size=3) == vocab
    assert vocab.index("Two") == 1
    assert "YES" in vocab
    assert vocab.index("red") is None
    # mode of the answers is used when multiple_choice_answer is absent.
    no_mc = VqaExample(1, 1, "q?", ("a red", "red", "blue", "blue", "red"))
    assert build_answer_vocab([no_mc], size=5).answers == ("red",)
    with pytest.raises(ValueError, match="no answered"):
        build_answer_vocab([VqaExample(9, 9, "q?")])


def test_vocab_save_load(tmp_path):
    vocab = AnswerVocab(("yes", "no", "2"))
    vocab.save(tmp_path / "v.json")
    assert AnswerVocab.load(tmp_path / "v.json") == vocab


def test_soft_targets_and_oov_counting():
    vocab = AnswerVocab(("yes", "no", "2", "red"))
    t = soft_targets(["two"] * 3 + ["2"] + ["Red"] * 2 + ["purple"] * 3 + ["teal"], vocab)
    assert t.indices == (2, 3)
    assert t.scores == pytest.approx((1.0, 0.6))  # 4 votes for "2", 2 for "red"
    assert (t.num_answers, t.num_oov) == (10, 4)
    dense = t.dense(4)
    assert dense.tolist() == pytest.approx([0, 0, 1.0, 0.6])
    assert soft_targets(["teal"] * 10, vocab).all_oov


def test_build_targets_skips_all_oov_only_in_training():
    vocab = AnswerVocab(("yes", "no"))
    examples = [_ex(1, "yes"), _ex(2, "purple"), _ex(3, "no", ["no"] * 9 + ["teal"])]
    kept, stats = build_targets(examples, vocab, training=True)
    assert [ex.question_id for ex, _ in kept] == [1, 3]
    assert stats == {
        "questions": 3,
        "kept": 2,
        "skipped_all_oov": 1,
        "answers": 30,
        "answers_oov": 11,
        "oov_rate": pytest.approx(11 / 30),
    }
    kept, stats = build_targets(examples, vocab, training=False)
    assert len(kept) == 3
    assert stats["skipped_all_oov"] == 0
    assert kept[1][1].all_oov


# ---------------------------------------------------------------- official files
def _write_vqa(tmp_path, questions, annotations=None):
    qpath = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"
    qpath.write_text(
        json.dumps(
            {
                "info": {},
                "task_type": "Open-Ended",
                "data_type": "mscoco",
                "data_subtype": "val2014",
                "questions": questions,
            }
        )
    )
    if annotations is None:
        return qpath, None
    apath = tmp_path / "v2_mscoco_val2014_annotations.json"
    apath.write_text(json.dumps({"info": {}, "data_subtype": "val2014", "annotations": annotations}))
    return qpath, apath


def _ann(qid, image_id, answers, mc, atype="other", qtype="what color is the"):
    return {
        "question_id": qid,
        "image_id": image_id,
        "question_type": qtype,
        "answer_type": atype,
        "multiple_choice_answer": mc,
        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)],
    }


QUESTIONS = [
    {"image_id": 42, "question": "What color is the cat?", "question_id": 42000},
    {"image_id": 42, "question": "How many cats?", "question_id": 42001},
]


def test_read_vqa_official_files(tmp_path):
    anns = [
        _ann(42001, 42, ["2"] * 10, "2", "number", "how many"),
        _ann(42000, 42, ["black"] * 7 + ["gray"] * 3, "black"),
    ]
    qpath, apath = _write_vqa(tmp_path, QUESTIONS, anns)
    examples = read_vqa(qpath, apath)
    assert [e.question_id for e in examples] == [42000, 42001]  # questions-file order
    first = examples[0]
    assert (first.image_id, first.question, first.multiple_choice_answer) == (42, "What color is the cat?", "black")
    assert first.answers == ("black",) * 7 + ("gray",) * 3
    assert first.answer_type == "other"
    test = read_vqa(qpath)  # a test split: questions only
    assert test[1] == VqaExample(42001, 42, "How many cats?")


@pytest.mark.parametrize(
    "questions, annotations, message",
    [
        ([{"image_id": 1, "question": "q?"}], None, r"question #0 \(question_id=None\).*'question_id'"),
        ([{"image_id": "1", "question": "q?", "question_id": 5}], None, "question_id=5.*'image_id'"),
        (QUESTIONS + [QUESTIONS[0]], None, "question_id=42000.*duplicate"),
        (QUESTIONS, [_ann(42000, 42, ["a"], "a")], "no annotation for 1 question.*42001"),
        (QUESTIONS, [_ann(42000, 42, ["a"], "a"), _ann(42001, 7, ["a"], "a")], "42001.*image_id differs"),
        (QUESTIONS, [_ann(42000, 42, [], "a"), _ann(42001, 42, ["a"], "a")], "42000.*'answers'"),
        (QUESTIONS, [_ann(42000, 42, ["a"], "a"), _ann(9, 42, ["a"], "a")], "question_id=9.*no such question"),
    ],
)
def test_read_vqa_errors_name_file_and_question(tmp_path, questions, annotations, message):
    qpath, apath = _write_vqa(tmp_path, questions, annotations)
    with pytest.raises(VqaFormatError, match=message) as info:
        read_vqa(qpath, apath)
    assert "v2_" in str(info.value)


def test_read_vqa_bad_files(tmp_path):
    with pytest.raises(VqaFormatError, match="file not found"):
        read_vqa(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(VqaFormatError, match="bad.json.*'questions' list"):
        read_vqa(bad)


# ---------------------------------------------------------------- results and evaluation
def test_results_file_and_evaluation(tmp_path):
    examples = [
        _ex(1, "yes", atype="yes/no", qtype="is there"),
        _ex(2, "2", ["2"] * 2 + ["3"] * 8, atype="number", qtype="how many"),
        _ex(3, "red"),
    ]
    path = write_vqa_results(
        tmp_path / "res.json",
        [
            {"question_id": 1, "answer": "Yes"},
            {"question_id": 2, "answer": "two"},
            {"question_id": 3, "answer": "blue"},
        ],
        question_ids=[1, 2, 3],
    )
    data = json.loads(path.read_text())
    assert data == [
        {"question_id": 1, "answer": "Yes"},
        {"question_id": 2, "answer": "two"},
        {"question_id": 3, "answer": "blue"},
    ]
    result = evaluate_vqa(read_vqa_results(path), examples)
    # master: "Yes" vs ten "yes" scores 0; "two" vs 2x"2" + 8x"3" (humans disagree) scores 0.6
    assert result["rule"] == "official"
    assert result["unrounded"]["overall"] == pytest.approx(100 * (0.0 + 0.6 + 0.0) / 3)
    assert result["overall"] == 20.0
    assert result["per_answer_type"] == {"number": 60.0, "other": 0.0, "yes/no": 0.0}
    assert result["per_question_type"]["how many"] == 60.0
    legacy = evaluate_vqa(read_vqa_results(path), examples, rule="legacy-2016")
    assert legacy["overall"] == 53.33  # round(100 * 1.6 / 3, 2), as the official script prints
    assert legacy["unrounded"]["overall"] == pytest.approx(160 / 3)
    with pytest.raises(ValueError, match="1 missing"):
        evaluate_vqa({1: "yes", 2: "2"}, examples)
    with pytest.raises(ValueError, match="predicted twice"):
        write_vqa_results(tmp_path / "r.json", [{"question_id": 1, "answer": "a"}] * 2)
    with pytest.raises(ValueError, match="1 unknown"):
        write_vqa_results(tmp_path / "r.json", {1: "a", 4: "b"}, question_ids=[1])


def test_missing_images_are_dropped_and_counted():
    examples = [_ex(1, "yes"), _ex(2, "no"), _ex(3, "red")]  # image ids 101, 102, 103
    kept, stats = drop_missing_images(examples, [101, 103, 999])
    assert [ex.question_id for ex in kept] == [1, 3]
    assert stats == {"questions_missing_image": 1, "images_missing": 1, "example_missing_image_ids": [102]}
    assert coco_image_name(42, "val2014") == "COCO_val2014_000000000042"
