"""Text embedding w_hat = LN(w + p + s_w), with Hugging Face BertEmbeddings parameter
names (word/position/token_type embeddings, LayerNorm) so BERT checkpoints load."""

from __future__ import annotations

import torch
from torch import nn

from .config import PixelBertConfig


class TextEmbedding(nn.Module):
    def __init__(self, cfg: PixelBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        # s_w: the paper's text semantic embedding is BERT's segment (token type) embedding.
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.max_positions = cfg.max_position_embeddings

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.max_positions:
            raise ValueError(f"text of {length} tokens exceeds max_position_embeddings={self.max_positions}")
        positions = torch.arange(length, device=input_ids.device)[None]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))
