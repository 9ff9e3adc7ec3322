"""The demo's stand-in for the paper's ImageNet start: a visual-semantic warm start.

Pixel-BERT starts its CNN from ImageNet and its transformer from BERT, so the pixel
features already mean something before pre-training begins. A CPU-sized demo has no
ImageNet CNN, and a randomly initialised one gives pixel tokens that barely differ
between images: ITM then stays at chance for the whole run. This trains the visual side
(CNN, projection, LayerNorm) on the synthetic scenes' labels, DeViSE-style (Frome et
al., 2013): each label word present in a scene (its colours, shapes and background)
must be the nearest word of at least one of its pixel tokens, where the words are the
text side's own embeddings of those words. The pixel tokens then start in the space of
the word embeddings, as an ImageNet CNN starts with features that separate objects.

The result is a safetensors file of ``visual.*`` tensors, loaded by ``model.visual_weights``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from pixelbert_dist.data.builders.synthetic import BACKGROUNDS, COLORS, SHAPES
from pixelbert_dist.data.loader import build_loader
from pixelbert_dist.data.text import load_tokenizer
from pixelbert_dist.data.decode.images import pad_batch, round_up
from pixelbert_dist.model import PixelBert
from pixelbert_dist.train.config import RunConfig

WORDS = list(COLORS) + list(SHAPES) + list(BACKGROUNDS)


def scene_targets(metas: list[dict]) -> torch.Tensor:
    """[B, len(WORDS)] multi-hot: the colours, shapes and background of each scene."""
    out = torch.zeros(len(metas), len(WORDS))
    for row, meta in enumerate(metas):
        words = [meta["background"]] + [w for obj in meta["objects"] for w in (obj["color"], obj["shape"])]
        out[row, [WORDS.index(w) for w in words]] = 1
    return out


class WordProbe(nn.Module):
    """Scores each label word by its best pixel token: cosine(token, word) * scale + bias."""

    def __init__(self, model: PixelBert, tokenizer):
        super().__init__()
        ids = tokenizer.convert_tokens_to_ids(WORDS)
        unknown = [w for w, i in zip(WORDS, ids) if i == tokenizer.unk_token_id]
        if unknown:
            raise ValueError(
                f"the tokenizer has no single token for {unknown}: the warm start needs one embedding per label word"
            )
        emb = model.embeddings
        with torch.no_grad():  # the words as the transformer sees them: after the embedding LayerNorm
            self.register_buffer("words", F.normalize(emb.LayerNorm(emb.word_embeddings.weight[ids]), dim=-1))
        self.scale, self.bias = nn.Parameter(torch.tensor(10.0)), nn.Parameter(torch.tensor(-5.0))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, semantic: torch.Tensor) -> torch.Tensor:
        cosine = F.normalize(tokens - semantic, dim=-1) @ self.words.T  # [B, N, words]
        best = cosine.masked_fill(~mask[..., None], -1.0).amax(1)
        return best * self.scale + self.bias


def _label_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return ((logits > 0) == targets.bool()).float().mean().item()


def warmstart_visual(
    cfg: RunConfig,
    model: PixelBert,
    out_path: str | Path,
    steps: int = 400,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
) -> dict:
    """Train ``model.visual`` on ``cfg.data.train_shards``; write its tensors to ``out_path``
    (safetensors) and return the train and held-out (``val_shards``) label accuracies."""
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(cfg.data.vocab_dir)
    probe, visual = WordProbe(model, tokenizer), model.visual
    # Start the pixel LayerNorm at the text embeddings' one: the same scale as the words.
    visual.LayerNorm.load_state_dict(model.embeddings.LayerNorm.state_dict())
    images, targets = _decode_split(cfg, cfg.data.train_shards, tokenizer, batch_size)
    optim = torch.optim.AdamW([*visual.parameters(), *probe.parameters()], lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optim, lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    buckets = _size_buckets(images)
    weights = torch.tensor([len(b) for b in buckets], dtype=torch.float)
    visual.train()
    accuracy = []
    for _ in tqdm(range(steps), desc="visual warm start"):
        bucket = buckets[int(torch.multinomial(weights, 1, generator=generator))]
        pick = bucket[torch.randint(len(bucket), (batch_size,), generator=generator)]
        logits = probe(*visual(*_batch(images, pick.tolist())), visual.semantic)
        F.binary_cross_entropy_with_logits(logits, targets[pick]).backward()
        optim.step()
        optim.zero_grad()
        schedule.step()
        accuracy.append(_label_accuracy(logits.detach(), targets[pick]))
    result = {"steps": steps, "train_label_accuracy": sum(accuracy[-20:]) / len(accuracy[-20:])}
    if cfg.data.val_shards:
        result["val_label_accuracy"], result["val_all_absent_accuracy"] = _evaluate(
            cfg, visual, probe, tokenizer, batch_size
        )
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    save_file({f"visual.{k}": v.detach().contiguous() for k, v in visual.state_dict().items()}, str(out_path))
    return result


def _decode_split(cfg: RunConfig, shards: str, tokenizer, batch_size: int):
    """Every image of a (small, synthetic) split, decoded once through the configured loader
    and kept unpadded, with its label targets: the warm start then draws its batches from
    memory instead of decoding each image again every epoch."""
    loader = build_loader(cfg.data, shards, batch_size, train=False, tokenizer=tokenizer)
    position = {ref.key: i for i, ref in enumerate(loader.index.samples)}
    images, metas = [], []
    for batch in tqdm(loader, desc=f"decode {Path(shards).name}", leave=False):
        for image, (height, width), key, pad in zip(
            batch["images"], batch["image_sizes"].tolist(), batch["keys"], batch["is_pad"].tolist()
        ):
            if not pad:
                images.append(image[:, :height, :width].clone())
                metas.append(loader.index.meta(position[key]))
    return images, scene_targets(metas)


def _size_buckets(images: list[torch.Tensor]) -> list[torch.Tensor]:
    """Indices grouped by padded size: a batch of one bucket pads nothing extra (one
    portrait image among landscape ones would pad the whole batch to a square)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault((round_up(image.shape[1]), round_up(image.shape[2])), []).append(i)
    return [torch.tensor(group) for group in groups.values()]


def _batch(images: list[torch.Tensor], pick: list[int]):
    return pad_batch([images[i] for i in pick])


@torch.no_grad()
def _evaluate(cfg: RunConfig, visual: nn.Module, probe: WordProbe, tokenizer, batch_size: int):
    """Held-out label accuracy, and that of always answering "absent" (the blind baseline)."""
    images, targets = _decode_split(cfg, cfg.data.val_shards, tokenizer, batch_size)
    visual.eval()
    starts = range(0, len(images), batch_size)
    logits = torch.cat(
        [probe(*visual(*_batch(images, range(i, min(i + batch_size, len(images))))), visual.semantic) for i in starts]
    )
    visual.train()
    return _label_accuracy(logits, targets), 1 - targets.mean().item()
