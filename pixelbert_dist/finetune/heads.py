"""Task heads on a pre-trained PixelBert, as DeepSpeed-trainable modules.

Each model holds the exported ``PixelBert`` as ``backbone`` (the CNN stays under
``backbone.visual.backbone``, so the SGD/AdamW split of the optimiser still finds it)
and a new ``head``. ``forward(batch)`` returns ``loss`` and the task's logits/scores;
the pixel tokens come from ``encode_pixels`` with sampling off (every valid pixel).

* VQA: an MLP on the pooled [CLS] vector -> one logit per vocabulary answer, trained
  with binary cross-entropy against the soft scores (the paper, after BUTD).
* NLVR2: the sentence runs with each of its two images; the two pooled [CLS] vectors
  are concatenated -> MLP -> True/False.
* Retrieval: the ITM head itself; per pair, ``num_negatives`` random captions of other
  images are scored without gradients, and only the hardest go through backprop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pixelbert_dist.finetune.retrieval_metrics import hardest_negatives
from pixelbert_dist.model import PixelBert

TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def mlp_head(in_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Sequential:
    """Linear -> GELU -> LayerNorm -> Dropout -> Linear (the UNITER / Pixel-BERT classifier)."""
    head = nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.GELU(),
        nn.LayerNorm(hidden, eps=1e-12),
        nn.Dropout(dropout),
        nn.Linear(hidden, out_dim),
    )
    for module in head:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
    return head


class _Finetuned(nn.Module):
    def __init__(self, backbone: PixelBert, freeze_cnn: bool = False):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        self.freeze_cnn = freeze_cnn
        if freeze_cnn:
            for p in backbone.visual.backbone.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_cnn:  # a frozen CNN keeps its BatchNorm statistics too
            self.backbone.visual.backbone.eval()
        return self

    def pixels(self, batch: dict):
        """Pixel tokens and mask; an image flagged ``text_only`` (its own was missing) is
        masked out whole, so its example is encoded from the text alone."""
        pixels, mask = self.backbone.encode_pixels(batch["images"], batch["image_sizes"])
        if batch.get("text_only") is not None:
            mask = mask & ~batch["text_only"].to(mask.device)[:, None]
        return pixels, mask

    def pooled(self, text: dict, pixels, mask) -> torch.Tensor:
        return self.backbone.pooler(self.backbone.encode_joint(text, pixels, mask))


class VqaModel(_Finetuned):
    def __init__(self, backbone: PixelBert, num_answers: int, dropout: float = 0.1, freeze_cnn: bool = False):
        super().__init__(backbone, freeze_cnn)
        h = backbone.config.hidden_size
        self.head = mlp_head(h, 2 * h, num_answers, dropout)

    def forward(self, batch: dict) -> dict:
        text = {k: batch[k] for k in TEXT_KEYS}
        logits = self.head(self.pooled(text, *self.pixels(batch))).float()
        out = {"logits": logits}
        if batch.get("targets") is not None:
            # BCE summed over answers, mean over questions (x num_answers of the usual mean)
            out["loss"] = (
                F.binary_cross_entropy_with_logits(logits, batch["targets"].float(), reduction="sum") / logits.shape[0]
            )
        return out


class Nlvr2Model(_Finetuned):
    """``images`` holds 2B images: rows 2i and 2i+1 are example i's left and right."""

    def __init__(self, backbone: PixelBert, dropout: float = 0.1, freeze_cnn: bool = False):
        super().__init__(backbone, freeze_cnn)
        h = backbone.config.hidden_size
        self.head = mlp_head(2 * h, 2 * h, 2, dropout)

    def forward(self, batch: dict) -> dict:
        pixels, mask = self.pixels(batch)
        text = {k: batch[k].repeat_interleave(2, dim=0) for k in TEXT_KEYS}
        pooled = self.pooled(text, pixels, mask)
        logits = self.head(pooled.reshape(pooled.shape[0] // 2, -1)).float()
        out = {"logits": logits}
        if batch.get("labels") is not None:
            out["loss"] = F.cross_entropy(logits, batch["labels"])
        return out


class RetrievalModel(_Finetuned):
    """Positive pairs plus ``negatives`` [B*N, L] captions (N per pair, rows of pair i at
    i*N..i*N+N-1). Loss: softmax over (positive, hardest negatives) of the match score
    ``itm_logit[1] - itm_logit[0]`` plus the binary ITM cross-entropy on the same rows."""

    def __init__(
        self,
        backbone: PixelBert,
        hard_negatives: int = 5,
        rank_weight: float = 1.0,
        itm_weight: float = 1.0,
        freeze_cnn: bool = False,
    ):
        super().__init__(backbone, freeze_cnn)
        self.hard, self.rank_weight, self.itm_weight = hard_negatives, rank_weight, itm_weight

    def match_logits(self, text: dict, pixels, mask) -> torch.Tensor:
        """The pre-trained ITM classifier's two logits (fine-tuned in place, no new head)."""
        return self.backbone.itm_head(self.pooled(text, pixels, mask)).float()

    def forward(self, batch: dict) -> dict:
        pixels, mask = self.pixels(batch)
        text = {k: batch[k] for k in TEXT_KEYS}
        b = pixels.shape[0]
        if batch.get("negatives") is None:
            logits = self.match_logits(text, pixels, mask)
            return {"logits": logits, "scores": logits[:, 1] - logits[:, 0]}  # the ITM margin, as ranked
        neg = batch["negatives"]
        n = neg["input_ids"].shape[0] // b
        with torch.no_grad():  # score all N negatives, keep the hardest for backprop
            rep = lambda x: x.detach().repeat_interleave(n, dim=0)  # noqa: E731
            scores = self.match_logits(neg, rep(pixels), rep(mask))
            scores = (scores[:, 1] - scores[:, 0]).view(b, n)
            hard = hardest_negatives(scores, None, self.hard)  # [B, k]
        rows = (hard + torch.arange(b, device=hard.device)[:, None] * n).flatten()
        # positives and negatives are tokenised to one length (the collate pads them together)
        both = {k: torch.cat([text[k], neg[k][rows]], 0) for k in TEXT_KEYS}
        rep_k = lambda x: torch.cat([x, x.repeat_interleave(self.hard, dim=0)], 0)  # noqa: E731
        logits = self.match_logits(both, rep_k(pixels), rep_k(mask))
        match = logits[:, 1] - logits[:, 0]
        ranking = torch.cat([match[:b, None], match[b:].view(b, self.hard)], 1)  # positive first
        rank_loss = F.cross_entropy(ranking, torch.zeros(b, dtype=torch.long, device=match.device))
        labels = torch.cat([torch.ones(b), torch.zeros(b * self.hard)]).long().to(logits.device)
        itm_loss = F.cross_entropy(logits, labels)
        return {
            "loss": self.rank_weight * rank_loss + self.itm_weight * itm_loss,
            "rank_loss": rank_loss,
            "itm_loss": itm_loss,
            "rank_acc": (ranking.argmax(1) == 0).float().mean(),
        }
