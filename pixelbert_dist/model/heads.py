"""Pooler, MLM head (tied to the word embeddings) and ITM head, with Hugging Face names
(`pooler.dense`, `cls.predictions.*` -> `mlm_head.*`) so BERT checkpoints fill them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import PixelBertConfig


class Pooler(nn.Module):
    def __init__(self, cfg: PixelBertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class Transform(nn.Module):  # HF: cls.predictions.transform
    def __init__(self, cfg: PixelBertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x):
        return self.LayerNorm(F.gelu(self.dense(x)))


class MLMHead(nn.Module):
    """Predicts masked tokens. The decoder weight IS the word-embedding matrix: the same
    Parameter registered in both modules (as Hugging Face ties it), which ZeRO-3 gathers
    for whichever module runs."""

    def __init__(self, cfg: PixelBertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = Transform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden)) + self.bias


class ITMHead(nn.Module):
    """Binary image-text matching classifier on the pooled [CLS] vector."""

    def __init__(self, cfg: PixelBertConfig):
        super().__init__()
        self.classifier = nn.Linear(cfg.hidden_size, 2)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(pooled)
