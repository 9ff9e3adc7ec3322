"""Retrieval: Karpathy split reader, recall@K on hand-computed matrices (ties broken by
index as a stable sort does, checked against a plain sort), hard negatives."""

import json

import pytest
import torch

from pixelbert_dist.finetune.retrieval_metrics import (
    KarpathyFormatError,
    flatten_captions,
    hardest_negatives,
    read_karpathy_split,
    sample_negatives,
)
from pixelbert_dist.train import recall  # recall@K's home, shared with pre-training's probe
from pixelbert_dist.train.recall import recall_at_k, retrieval_ranks

# 3 images x 6 captions; captions 0,1 -> image 0; 2,3 -> image 1; 4,5 -> image 2.
OWNER = [0, 0, 1, 1, 2, 2]
SCORES = [
    [0.9, 0.1, 0.5, 0.2, 0.3, 0.1],  # best own 0.9, no negative >= 0.9        -> i2t rank 0
    [0.8, 0.7, 0.6, 0.75, 0.1, 0.2],  # best own 0.75, caption 0 (0.8) above    -> rank 1
    [0.4, 0.4, 0.4, 0.4, 0.4, 0.1],  # best own 0.4 (caption 4), four lower-index negatives tie -> rank 4
]
# t2i, column by column (own image's score vs the other two images' scores):
#  c0 .9 vs .8,.4 -> 0 | c1 .1 vs .7,.4 -> 2 | c2 .6 vs .5,.4 -> 0 | c3 .75 vs .2,.4 -> 0
#  c4 .4 vs .3,.1 -> 0 | c5 .1 vs .1 (tie, image 0 < 2: ahead), .2 -> 2


def test_ranks_by_hand():
    i2t, t2i = retrieval_ranks(torch.tensor(SCORES), OWNER)
    assert i2t.tolist() == [0, 1, 4]
    assert t2i.tolist() == [0, 2, 0, 0, 0, 2]


def test_recall_at_k_by_hand():
    r = recall_at_k(SCORES, OWNER, ks=(1, 2, 3, 5))
    expected = {
        "i2t_r1": 100 / 3,
        "i2t_r2": 200 / 3,
        "i2t_r3": 200 / 3,
        "i2t_r5": 100.0,
        "t2i_r1": 400 / 6,
        "t2i_r2": 400 / 6,
        "t2i_r3": 100.0,
        "t2i_r5": 100.0,
    }
    expected["rsum"] = sum(expected.values())
    expected["i2t_mean"] = sum(expected[f"i2t_r{k}"] for k in (1, 2, 3, 5)) / 4
    expected["t2i_mean"] = sum(expected[f"t2i_r{k}"] for k in (1, 2, 3, 5)) / 4
    expected["r_mean"] = (expected["i2t_mean"] + expected["t2i_mean"]) / 2
    assert r == pytest.approx(expected)


def test_ties_go_to_the_lower_index_as_a_stable_sort_orders_them():
    # Every score equal: each image's first caption sits after the captions of the images
    # before it (image i: rank 2i); each caption's image after the images before it.
    i2t, t2i = retrieval_ranks(torch.zeros(3, 6), OWNER)
    assert i2t.tolist() == [0, 2, 4]
    assert t2i.tolist() == [0, 0, 1, 1, 2, 2]
    r = recall_at_k(torch.zeros(3, 6), OWNER, ks=(1, 5))
    assert (r["i2t_r1"], r["t2i_r1"]) == (pytest.approx(100 / 3), pytest.approx(100 / 3))


def test_two_images_sharing_a_caption_text_give_one_hit():
    # Images 0 and 1 each own one caption with the same text (identical columns 0 and 2);
    # the references' sort credits the lower index (image 0), not neither (the old rule).
    scores = torch.tensor([[5.0, 1.0, 5.0, 0.0], [5.0, 0.0, 5.0, 1.0]])
    i2t, t2i = retrieval_ranks(scores, [0, 0, 1, 1])
    assert i2t.tolist() == [0, 1]
    assert t2i.tolist() == [0, 0, 1, 0]  # caption 2 (image 1) ties image 0 and comes second


def _reference_ranks(scores, owner):
    """Positions after a plain stable sort, highest first (Python's sort is stable)."""
    i2t = []
    for i, row in enumerate(scores):
        order = sorted(range(len(row)), key=lambda t: -row[t])
        i2t.append(min(order.index(t) for t in range(len(row)) if owner[t] == i))
    t2i = []
    for t in range(len(owner)):
        order = sorted(range(len(scores)), key=lambda i: -scores[i][t])
        t2i.append(order.index(owner[t]))
    return i2t, t2i


def test_chunked_ranks_match_a_plain_loop(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    owner = [i // 5 for i in range(35)] + [3]  # 7 images, one with 6 captions
    scores = torch.randint(0, 6, (7, 36), generator=gen).float()  # many ties
    monkeypatch.setattr(recall, "_CHUNK", 3)  # exercise chunk boundaries
    i2t, t2i = retrieval_ranks(scores, owner)
    assert (i2t.tolist(), t2i.tolist()) == _reference_ranks(scores.tolist(), owner)


def test_recall_input_errors():
    with pytest.raises(ValueError, match="no caption"):
        recall_at_k(torch.zeros(3, 2), [0, 1])
    with pytest.raises(ValueError, match=r"\[num_images, num_texts\]"):
        recall_at_k(torch.zeros(3, 6), [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(torch.full((1, 1), float("nan")), [0])


def test_hardest_negatives():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.9, 0.3], [0.2, 0.2, 0.2, 0.7, 0.2]])
    positives = torch.tensor([[False, True, False, False, False], [False, False, False, True, False]])
    # Row 0: index 1 is a positive, so 3 (0.9) then 2 (0.5); row 1: four-way tie -> lowest indices.
    assert hardest_negatives(scores, positives, 2).tolist() == [[3, 2], [0, 1]]
    assert hardest_negatives(scores, None, 1).tolist() == [[1], [3]]
    with pytest.raises(ValueError, match="only 4 negatives"):
        hardest_negatives(scores, positives, 5)


def test_sample_negatives_then_hardest_five_of_twenty():
    owner = [i // 5 for i in range(50)]  # 10 images x 5 captions
    gen = torch.Generator().manual_seed(1)
    negs = sample_negatives(owner, [0, 7], 20, gen)
    assert negs.shape == (2, 20)
    for row, image in zip(negs.tolist(), [0, 7]):
        assert len(set(row)) == 20
        assert all(owner[t] != image for t in row)
    again = sample_negatives(owner, [0, 7], 20, torch.Generator().manual_seed(1))
    assert torch.equal(negs, again)
    scores = -negs.float()  # lower caption index = harder
    hard = hardest_negatives(scores, None, 5)
    picked = negs.gather(1, hard)
    assert picked.tolist() == [sorted(r)[:5] for r in negs.tolist()]
    with pytest.raises(ValueError, match="only 45 negative captions"):
        sample_negatives(owner, [0], 46)


def _karpathy(tmp_path, name, images):
    path = tmp_path / name
    path.write_text(json.dumps({"images": images, "dataset": name.split("_")[1][:-5]}))
    return path


def _img(split, filename, imgid, captions, **extra):
    return {
        "filename": filename,
        "imgid": imgid,
        "split": split,
        "sentids": [],
        "sentences": [{"tokens": c.split(), "raw": c, "imgid": imgid, "sentid": i} for i, c in enumerate(captions)],
        **extra,
    }


def test_read_karpathy_coco_and_flickr(tmp_path):
    coco = _karpathy(
        tmp_path,
        "dataset_coco.json",
        [
            _img("test", "COCO_val2014_000000000042.jpg", 0, ["A cat.", "a cat sits."], filepath="val2014", cocoid=42),
            _img("restval", "COCO_val2014_000000000043.jpg", 1, ["a dog."], filepath="val2014", cocoid=43),
            _img("train", "COCO_train2014_000000000044.jpg", 2, ["a bus."], filepath="train2014", cocoid=44),
        ],
    )
    test = read_karpathy_split(coco, "test")
    assert [(im.image_id, im.relative_path, im.captions) for im in test] == [
        (42, "val2014/COCO_val2014_000000000042.jpg", ("A cat.", "a cat sits."))
    ]
    assert [im.image_id for im in read_karpathy_split(coco, ("train", "restval"))] == [43, 44]
    flickr = _karpathy(
        tmp_path,
        "dataset_flickr30k.json",
        [
            _img("test", "1000092795.jpg", 0, ["two men.", "a man.", "men outside."]),
            _img("test", "10002456.jpg", 1, ["workers."]),
        ],
    )
    images = read_karpathy_split(flickr, "test")
    assert images[0].filepath is None
    assert images[0].relative_path == "1000092795.jpg"
    texts, owner = flatten_captions(images)
    assert texts == ["two men.", "a man.", "men outside.", "workers."]
    assert owner == [0, 0, 0, 1]


@pytest.mark.parametrize(
    "image, message",
    [
        (_img("test", "x.jpg", 0, []), r"image #0 \(x.jpg\): 'sentences'"),
        ({**_img("test", "x.jpg", 0, ["a"]), "imgid": "0"}, r"image #0 \(x.jpg\): needs an integer"),
        ({**_img("test", "x.jpg", 0, ["a"]), "split": None}, r"image #0: 'filename' and 'split'"),
    ],
)
def test_karpathy_errors(tmp_path, image, message):
    with pytest.raises(KarpathyFormatError, match=message):
        read_karpathy_split(_karpathy(tmp_path, "dataset_flickr8k.json", [image]), "test")
    with pytest.raises(KarpathyFormatError, match="no image in split"):
        read_karpathy_split(_karpathy(tmp_path, "dataset_f.json", [_img("val", "a.jpg", 0, ["a"])]), "test")
