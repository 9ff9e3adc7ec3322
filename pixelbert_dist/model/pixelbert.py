"""Pixel-BERT: CNN pixel features and BERT text embeddings in one transformer.

Input sequence: ``[CLS] w1..wn [SEP] [PAD].. v1..vk`` with one key-padding mask covering
both the text padding and the padding pixels of smaller images.

Batch keys read by ``forward``:
  images          float [B, 3, H, W], H and W multiples of 64 (optional: text-only)
  image_sizes     int [B, 2] valid (h, w) of each image before padding (optional)
  input_ids       int [B, L];  attention_mask int [B, L];  token_type_ids int [B, L] (optional)
  mlm_labels      int [B, L], -100 where no MLM loss is wanted (optional)
  itm_labels      int [B], 1 = caption matches the image (optional)
Returns a dict: hidden_states, pooled, itm_logits, mlm_logits [M, V] and mlm_targets [M]
(only the M masked positions: the vocabulary projection is the costliest matmul), each
loss present in the batch, and ``loss`` = mlm_weight * mlm_loss + itm_weight * itm_loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import PixelBertConfig
from .encoder import Encoder
from .heads import ITMHead, MLMHead, Pooler
from .hub import resolve_pretrained
from .pretrained import load_pretrained, save_pretrained
from .text import TextEmbedding
from .visual import VisualEmbedding


class PixelBert(nn.Module):
    def __init__(self, cfg: PixelBertConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = TextEmbedding(cfg)
        self.visual = VisualEmbedding(cfg)
        self.encoder = Encoder(cfg)
        self.pooler = Pooler(cfg)
        self.mlm_head = MLMHead(cfg, self.embeddings.word_embeddings)
        self.itm_head = ITMHead(cfg)
        for name, module in self.named_modules():
            if not name.startswith("visual.backbone"):  # the CNN keeps torchvision's init
                self._init_bert(module)

    @staticmethod
    def _init_bert(module: nn.Module) -> None:
        """BERT's initialisation: N(0, 0.02) weights, zero biases, LayerNorm at identity."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, VisualEmbedding):
            nn.init.normal_(module.semantic, std=0.02)

    def set_activation_checkpointing(self, mode: str) -> None:
        """ "none", "transformer" (encoder layers) or "all" (also the CNN stem and stages):
        what backward recomputes instead of keeping. Losses and gradients are unchanged."""
        self.config = self.config.replace(activation_checkpointing=mode)  # checks the value
        mode = self.config.activation_checkpointing
        self.encoder.checkpointing = mode in ("transformer", "all")
        self.visual.checkpointing = mode == "all"

    def pixel_sample_size(self) -> int:
        """Pixel random sampling is a pre-training regulariser: training mode only."""
        return self.config.pixel_sample_size if self.training else 0

    def encode_pixels(self, images: torch.Tensor, image_sizes: torch.Tensor | None = None):
        """Pixel tokens [B, K, H] and their mask [B, K] (sampled in training mode)."""
        return self.visual(images, image_sizes, self.pixel_sample_size())

    def encode_joint(
        self, text: dict, pixels: torch.Tensor | None = None, pixel_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The transformer over ``[CLS] text [SEP]`` followed by the given pixel tokens."""
        x = self.embeddings(text["input_ids"], text.get("token_type_ids"))
        mask = text["attention_mask"].bool()
        if pixels is not None:
            if pixels.shape[0] != x.shape[0]:
                raise ValueError(f"{pixels.shape[0]} images for {x.shape[0]} captions in one batch")
            x = torch.cat([x, pixels.to(x.dtype)], dim=1)
            mask = torch.cat([mask, pixel_mask], dim=1)
        return self.encoder(x, mask)

    def encode(self, batch: dict) -> torch.Tensor:
        """Hidden states [B, L(+K), H] of the joint sequence."""
        if batch.get("images") is None:
            return self.encode_joint(batch)
        return self.encode_joint(batch, *self.encode_pixels(batch["images"], batch.get("image_sizes")))

    def itm_score(self, text: dict, pixels: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
        """The ITM margin ``logit[match] - logit[no match]`` (fp32) of row-aligned (caption,
        image) pairs, the score retrieval ranks: the raw margin the rank loss trains, not
        log P(match), which in fp32 is exactly 0.0 for every margin above ~17. Pixel tokens
        come from ``encode_pixels`` once per image, so retrieval runs the CNN once per image."""
        logits = self.itm_head(self.pooler(self.encode_joint(text, pixels, pixel_mask))).float()
        return logits[:, 1] - logits[:, 0]

    def forward(self, batch: dict) -> dict:
        hidden = self.encode(batch)
        pooled = self.pooler(hidden)
        out = {"hidden_states": hidden, "pooled": pooled, "itm_logits": self.itm_head(pooled)}
        losses = []
        if batch.get("mlm_labels") is not None:
            labels = batch["mlm_labels"]
            selected = labels != -100
            out["mlm_logits"] = self.mlm_head(hidden[:, : labels.shape[1]][selected])
            out["mlm_targets"] = labels[selected]
            # Sum / count instead of mean: a batch with nothing masked gives 0, not NaN.
            mlm = F.cross_entropy(out["mlm_logits"].float(), out["mlm_targets"], reduction="sum")
            out["mlm_loss"] = mlm / selected.sum().clamp(min=1)
            losses.append(self.config.mlm_weight * out["mlm_loss"])
        if batch.get("itm_labels") is not None:
            out["itm_loss"] = F.cross_entropy(out["itm_logits"].float(), batch["itm_labels"])
            losses.append(self.config.itm_weight * out["itm_loss"])
        if losses:
            out["loss"] = sum(losses)
        return out

    @classmethod
    def from_pretrained(cls, path_or_repo_id, revision: str | None = None, **kwargs) -> "PixelBert":
        """Load an export folder (config.json + model.safetensors, checksums verified), in
        eval mode: a local folder, or a Hugging Face Hub repo id (``owner/name``, at
        ``revision``) holding one; see ``pretrained.load_pretrained`` and ``hub``."""
        return load_pretrained(cls, resolve_pretrained(path_or_repo_id, revision), **kwargs)

    def save_pretrained(self, folder, tokenizer=None, extra: dict | None = None):
        """Write an export folder (fp32 copies: this model keeps its dtype)."""
        return save_pretrained(self, folder, tokenizer, extra)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def set_activation_checkpointing(model: torch.nn.Module, mode: str) -> None:
    """``train.activation_checkpointing`` on every PixelBert inside ``model`` (a fine-tuning
    task model wraps one)."""
    found = [m for m in model.modules() if isinstance(m, PixelBert)]
    if not found:
        raise ValueError(f"train.activation_checkpointing={mode!r}: {type(model).__name__} holds no PixelBert")
    for pixelbert in found:
        pixelbert.set_activation_checkpointing(mode)
