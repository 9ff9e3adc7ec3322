"""NLVR2: official jsonl reader, image naming, metrics and predictions file."""

import json

import pytest

from pixelbert_dist.finetune.nlvr2_data import (
    Nlvr2FormatError,
    drop_missing_images,
    evaluate_nlvr2,
    image_keys,
    read_nlvr2,
    read_nlvr2_predictions,
    write_nlvr2_predictions,
)


def _line(identifier, sentence="one image has two dogs.", label="True", **extra):
    row = {
        "validation": {"W0": "True"},
        "sentence": sentence,
        "left_url": "http://x/l.jpg",
        "writer": "W1",
        "label": label,
        "right_url": "http://x/r.jpg",
        "synset": "n02084071",
        "query": "dog 12",
        "identifier": identifier,
        **extra,
    }
    return json.dumps(row)


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_image_keys():
    assert image_keys("dev-850-0-0") == ("dev-850-0-img0", "dev-850-0-img1")
    assert image_keys("test1-12-3-1") == ("test1-12-3-img0", "test1-12-3-img1")
    for bad in ("dev-850-0", "dev-x-0-0", "-1-2-3"):
        with pytest.raises(ValueError, match="split-set_id-pair_id-sentence_id"):
            image_keys(bad)


def test_read_official_jsonl(tmp_path):
    path = _write(
        tmp_path / "dev.json",
        [
            _line("dev-850-0-0"),
            "",
            _line("dev-850-1-0", label="False"),
            _line("dev-851-0-1", sentence="no dogs.", label="true"),
        ],
    )
    examples = read_nlvr2(path)
    assert [e.identifier for e in examples] == ["dev-850-0-0", "dev-850-1-0", "dev-851-0-1"]
    assert [e.label for e in examples] == [True, False, True]
    assert (examples[1].left_image, examples[1].right_image) == ("dev-850-1-img0", "dev-850-1-img1")
    assert examples[2].sentence == "no dogs."
    assert examples[0].left_path is None
    # Unlabelled lines (a hidden test split) read with label None.
    row = json.loads(_line("test2-1-0-0"))
    del row["label"]
    assert read_nlvr2(_write(tmp_path / "test2.json", [json.dumps(row)]))[0].label is None


def test_images_resolved_flat_and_in_train_directories(tmp_path):
    images = tmp_path / "images"
    (images / "7").mkdir(parents=True)
    for name in ("dev-1-0-img0", "dev-1-0-img1"):
        (images / f"{name}.png").write_bytes(b"png")
    for name in ("train-5-2-img0", "train-5-2-img1"):
        (images / "7" / f"{name}.png").write_bytes(b"png")
    dev = read_nlvr2(_write(tmp_path / "dev.json", [_line("dev-1-0-0")]), images)
    assert dev[0].right_path == images / "dev-1-0-img1.png"
    train = read_nlvr2(_write(tmp_path / "train.json", [_line("train-5-2-1", directory=7)]), images)
    assert train[0].left_path == images / "7" / "train-5-2-img0.png"
    missing = _write(tmp_path / "bad.json", [_line("dev-1-0-0"), _line("dev-2-0-0")])
    with pytest.raises(Nlvr2FormatError, match=r"bad.json:2: image dev-2-0-img0.png not found"):
        read_nlvr2(missing, images)


@pytest.mark.parametrize(
    "line, message",
    [
        (_line("dev-1-0-0", label="yes"), r"bad.json:2: label must be \"True\" or \"False\", got 'yes'"),
        (_line("dev-1-0-0", label=1), r"bad.json:2: label must be"),
        (_line("dev-1-0"), r"bad.json:2: identifier 'dev-1-0'"),
        ('{"identifier": "dev-1-0-0"', r"bad.json:2: not valid JSON"),
        (json.dumps({"identifier": "dev-1-0-0", "label": "True"}), r"bad.json:2: 'identifier' and 'sentence'"),
        (_line("dev-9-0-0"), r"bad.json:2: duplicate identifier dev-9-0-0"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = _write(tmp_path / "bad.json", [_line("dev-9-0-0"), line])
    with pytest.raises(Nlvr2FormatError, match=message):
        read_nlvr2(path)


def test_accuracy_and_consistency(tmp_path):
    # Sentence "dev-1-_-0" has two pairs, "dev-1-_-1" one, "dev-2-_-0" two.
    lines = [
        _line("dev-1-0-0", label="True"),
        _line("dev-1-1-0", label="False"),
        _line("dev-1-0-1", label="True"),
        _line("dev-2-0-0", label="False"),
        _line("dev-2-3-0", label="False"),
    ]
    examples = read_nlvr2(_write(tmp_path / "dev.json", lines))
    preds = {
        "dev-1-0-0": True,
        "dev-1-1-0": False,  # group fully right
        "dev-1-0-1": False,  # group wrong
        "dev-2-0-0": False,
        "dev-2-3-0": True,
    }  # one of two wrong
    result = evaluate_nlvr2(preds, examples)
    assert result == {
        "accuracy": pytest.approx(60.0),
        "consistency": pytest.approx(100 / 3),
        "num_examples": 5,
        "num_sentences": 3,
    }
    path = write_nlvr2_predictions(tmp_path / "pred.csv", preds, examples)
    assert path.read_text().splitlines()[:2] == ["dev-1-0-0,True", "dev-1-1-0,False"]
    assert read_nlvr2_predictions(path) == preds
    with pytest.raises(ValueError, match="1 missing"):
        evaluate_nlvr2({k: v for k, v in preds.items() if k != "dev-2-3-0"}, examples)


def test_missing_images_are_dropped_and_counted(tmp_path):
    examples = read_nlvr2(_write(tmp_path / "dev.json", [_line("dev-1-0-0"), _line("dev-1-1-0")]))
    kept, stats = drop_missing_images(examples, ["dev-1-0-img0", "dev-1-0-img1", "dev-1-1-img0"])
    assert [ex.identifier for ex in kept] == ["dev-1-0-0"]
    assert stats == {"examples_missing_image": 1, "images_missing": 1, "example_missing_images": ["dev-1-1-img1"]}
