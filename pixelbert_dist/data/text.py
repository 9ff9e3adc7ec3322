"""Tokenizer loading and the text side of a pre-training batch (MLM + ITM).

``TextCollator`` turns one caption per image into the text part of the batch contract:
``input_ids``, ``attention_mask``, ``token_type_ids``, ``mlm_labels`` and ``itm_labels``.
ITM negatives take the caption of another image in the same batch (the paper's 1:1
random negatives); MLM selects 15% of the real tokens in expectation, whatever the caption
length (``mlm_row_rates``), and masks them with BERT's 80/10/10 rule; only matching pairs
carry MLM labels. All randomness comes from the ``torch.Generator`` passed in, so a loader
that derives it from (seed, epoch, step) reproduces a batch exactly after a resume.
"""

from __future__ import annotations

from pathlib import Path

import torch

SYNTHETIC_VOCAB_DIR = Path(__file__).resolve().parent.parent / "assets" / "vocab_synthetic"
IGNORE_INDEX = -100


def load_tokenizer(vocab_dir: str | Path | None = None):
    """A ``BertTokenizer`` read from a local directory (never from a hub).

    ``None`` loads the shipped synthetic vocab; point it at a bert-base-uncased
    directory (vocab.txt [+ tokenizer_config.json]) for real data.
    """
    from transformers import BertTokenizer

    directory = Path(vocab_dir) if vocab_dir is not None else SYNTHETIC_VOCAB_DIR
    if not (directory / "vocab.txt").is_file():
        raise FileNotFoundError(f"no vocab.txt in tokenizer directory {directory}")
    return BertTokenizer.from_pretrained(str(directory), local_files_only=True)


def _uniform_pick(candidates: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per row, the column of one uniformly chosen True entry (argmax of masked noise)."""
    noise = torch.rand(candidates.shape, generator=generator)
    return noise.masked_fill(~candidates, -1.0).argmax(dim=1)


def mlm_row_rates(mlm_prob: float, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row length n = 0..max_tokens: (draw rate q_n, forcing rate f_n) such that
    Bernoulli(q_n) draws on every token, plus one uniformly chosen token with probability
    f_n where the row drew none, select exactly n * mlm_prob tokens in expectation:
    n q + f (1 - q)^n = n p.

    Where n p >= 1 every row keeps at least one selected token (f = 1, q solved by
    bisection: the left side grows with q, is 1 at q = 0 and >= n p at q = p). Where
    n p < 1 (a caption shorter than 1/p tokens) "at least one" would exceed the rate, so
    such rows draw exactly one token with probability n p (q = 0). Either way each token
    is selected with probability p exactly."""
    n = torch.arange(max_tokens + 1, dtype=torch.float64)
    target = n * mlm_prob
    low, high = torch.zeros_like(n), torch.full_like(n, mlm_prob)
    for _ in range(60):  # bisection to float64 precision
        mid = (low + high) / 2
        too_many = n * mid + (1 - mid) ** n > target
        low, high = torch.where(too_many, low, mid), torch.where(too_many, mid, high)
    forcing = target >= 1
    draw = torch.where(forcing, high, torch.zeros_like(n))
    force = torch.where(forcing, torch.ones_like(n), target)
    return draw.float(), force.float()


class TextCollator:
    """Tokenise captions and draw the ITM negatives and MLM masks for one batch."""

    def __init__(
        self,
        tokenizer,
        max_len: int = 40,
        mlm_prob: float = 0.15,
        itm_neg_prob: float = 0.5,
        pad_to_max_len: bool = False,
    ):
        if not 0.0 <= mlm_prob <= 1.0 or not 0.0 <= itm_neg_prob <= 1.0:
            raise ValueError(f"mlm_prob ({mlm_prob}) and itm_neg_prob ({itm_neg_prob}) must lie in [0, 1]")
        if max_len < 3:
            raise ValueError(f"max_len must be >= 3 ([CLS] word [SEP]), got {max_len}")
        self.tokenizer = tokenizer
        self.max_len, self.mlm_prob, self.itm_neg_prob = max_len, mlm_prob, itm_neg_prob
        self.pad_to_max_len = pad_to_max_len
        special = set(tokenizer.all_special_ids)
        vocab = tokenizer.get_vocab()
        # Random replacement tokens: real words only, never [CLS]/[PAD]/... or [unusedN].
        self.replacement_ids = torch.tensor(
            sorted(i for tok, i in vocab.items() if i not in special and not tok.startswith("[unused"))
        )
        self.mask_id = tokenizer.mask_token_id
        self.draw_rate, self.force_rate = mlm_row_rates(mlm_prob, max_len)

    def draw_itm(self, image_ids: list[str], generator: torch.Generator):
        """(partner index per row, itm_labels): a negative row takes another image's caption."""
        codes = {}
        ids = torch.tensor([codes.setdefault(str(i), len(codes)) for i in image_ids])
        other = ids[:, None] != ids[None, :]
        partner = _uniform_pick(other, generator)
        negative = (torch.rand(len(ids), generator=generator) < self.itm_neg_prob) & other.any(1)
        partner = torch.where(negative, partner, torch.arange(len(ids)))
        return partner, (~negative).long()

    def draw_mlm(self, input_ids, real, positive, generator: torch.Generator):
        """Masked input ids and labels (original id where selected, -100 elsewhere).

        Negative (mismatched) rows are masked exactly like positive ones but carry no
        labels: were only positives masked, "has a [MASK] token" would give ITM away
        (the model learns that shortcut, not image-text matching)."""
        lengths = real.sum(1).clamp(max=len(self.draw_rate) - 1)
        selected = (torch.rand(input_ids.shape, generator=generator) < self.draw_rate[lengths, None]) & real
        # A row that drew none gets one token, at the rate that keeps p exact (mlm_row_rates).
        empty = ~selected.any(1) & (torch.rand(len(lengths), generator=generator) < self.force_rate[lengths])
        forced = _uniform_pick(real, generator)
        selected[empty.nonzero().squeeze(1), forced[empty]] = True
        labels = torch.where(selected & positive[:, None], input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        action = torch.rand(input_ids.shape, generator=generator)
        random_tokens = self.replacement_ids[
            torch.randint(len(self.replacement_ids), input_ids.shape, generator=generator)
        ]
        masked = input_ids.clone()
        masked[selected & (action < 0.8)] = self.mask_id
        use_random = selected & (action >= 0.8) & (action < 0.9)
        masked[use_random] = random_tokens[use_random]
        return masked, labels

    def __call__(self, captions: list[str], image_ids: list[str], generator: torch.Generator) -> dict:
        if len(captions) != len(image_ids):
            raise ValueError(f"{len(captions)} captions for {len(image_ids)} image ids")
        for caption, image_id in zip(captions, image_ids):
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(f"empty caption for image {image_id!r}")
        partner, itm_labels = self.draw_itm(image_ids, generator)
        texts = [captions[j] for j in partner.tolist()]
        enc = self.tokenizer(
            texts,
            padding="max_length" if self.pad_to_max_len else "longest",
            truncation=True,
            max_length=self.max_len,
            return_special_tokens_mask=True,
            return_tensors="pt",
        )
        input_ids = enc["input_ids"].long()
        attention_mask = enc["attention_mask"].long()
        real = attention_mask.bool() & ~enc["special_tokens_mask"].bool()
        input_ids, mlm_labels = self.draw_mlm(input_ids, real, itm_labels.bool(), generator)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": torch.zeros_like(input_ids),
            "mlm_labels": mlm_labels,
            "itm_labels": itm_labels,
        }
