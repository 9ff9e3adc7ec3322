"""The cross-modal transformer: BERT layers whose parameter names match Hugging Face's
BertModel, so a BERT checkpoint loads key for key. Attention goes through
`scaled_dot_product_attention` (FlashAttention / memory-efficient / cuDNN kernels on GPU);
the `eager` path is the textbook formula, kept as the reference for tests and benchmarks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import PixelBertConfig


def eager_attention(q, k, v, mask, dropout_p: float = 0.0):
    """softmax(q k^T / sqrt(d) + mask) v, with a boolean key mask (True = attend)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = F.dropout(scores.softmax(dim=-1), p=dropout_p, training=dropout_p > 0)
    return probs @ v


class SelfAttention(nn.Module):  # HF: attention.self
    def __init__(self, cfg: PixelBertConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout_p = cfg.attention_dropout
        self.implementation = cfg.attn_implementation

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.num_heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        p = self.dropout_p if self.training else 0.0
        if self.implementation == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:
            out = eager_attention(q, k, v, mask, p)
        return out.transpose(1, 2).flatten(2)


class DenseResidualNorm(nn.Module):  # HF: attention.output and output
    def __init__(self, cfg: PixelBertConfig, in_features: int):
        super().__init__()
        self.dense = nn.Linear(in_features, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):  # HF: attention
    def __init__(self, cfg: PixelBertConfig):
        super().__init__()
        self.self = SelfAttention(cfg)
        self.output = DenseResidualNorm(cfg, cfg.hidden_size)

    def forward(self, x, mask):
        return self.output(self.self(x, mask), x)


class Intermediate(nn.Module):  # HF: intermediate
    def __init__(self, cfg: PixelBertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x):
        return F.gelu(self.dense(x))


class Layer(nn.Module):  # HF: encoder.layer.N
    def __init__(self, cfg: PixelBertConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = DenseResidualNorm(cfg, cfg.intermediate_size)

    def forward(self, x, mask):
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    def __init__(self, cfg: PixelBertConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))
        self.checkpointing = cfg.activation_checkpointing in ("transformer", "all")

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """x [B, S, H]; key_mask [B, S] bool, True where a token may be attended to."""
        mask = key_mask[:, None, None, :]  # broadcast over heads and queries
        for layer in self.layer:
            if self.checkpointing and self.training and torch.is_grad_enabled():
                # keeps only the layer's input; RNG state (dropout) is replayed on recompute
                x = checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask)
        return x
