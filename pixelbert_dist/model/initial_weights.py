"""The initial weights each preset expects (docs/weights.md, "Weights you need"), and a
check of a run's files against them before training starts:

    python -m pixelbert_dist.train.check_weights CONFIG.yaml [key=value ...]

What is checked, without building the model's tensors: a BERT folder has its files and the
preset's shape (config.json); a CNN file has torchvision's keys and shapes for the preset's
trunk, and, when its name follows torchvision's ``NAME-<sha256 prefix>.pth``, bytes whose
sha256 starts with that prefix (torch.hub's own check on download)."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import PixelBertConfig
from .weights import read_state_dict

BERT_FILES = ("config.json", "vocab.txt")
BERT_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # either
# A BERT config.json key -> the PixelBertConfig field that must equal it.
BERT_SHAPE = {
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
}
# torchvision's ImageNet files per trunk (torchvision.models.resnet), by weights enum.
TORCHVISION_FILES = {
    "resnet18": {"resnet18-f37072fd.pth": "IMAGENET1K_V1"},
    "resnet50": {"resnet50-0676ba61.pth": "IMAGENET1K_V1", "resnet50-11ad3fa6.pth": "IMAGENET1K_V2"},
    "resnext101_32x8d": {
        "resnext101_32x8d-8ba56ff5.pth": "IMAGENET1K_V1",
        "resnext101_32x8d-110c445d.pth": "IMAGENET1K_V2",
    },
    "resnext152_32x8d": {},  # torchvision ships none: a converted file with torchvision's key names
}
HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.\w+$")  # torch.hub.HASH_REGEX, anchored at the suffix


@dataclass
class Finding:
    ok: bool
    text: str

    def __str__(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.text}"


def check_bert_dir(folder: str | Path, cfg: PixelBertConfig) -> list[Finding]:
    folder = Path(folder)
    if not folder.is_dir():
        return [Finding(False, f"model.bert_dir={str(folder)!r} is not a folder")]
    out = [Finding((folder / name).is_file(), f"{folder / name}") for name in BERT_FILES]
    weights = [name for name in BERT_WEIGHT_FILES if (folder / name).is_file()]
    out.append(Finding(bool(weights), f"{folder}: {weights[0] if weights else ' or '.join(BERT_WEIGHT_FILES)}"))
    if (folder / "config.json").is_file():
        bert = json.loads((folder / "config.json").read_text())
        wrong = [
            f"{key}={bert.get(key)} (preset: {getattr(cfg, ours)})"
            for key, ours in BERT_SHAPE.items()
            if bert.get(key) != getattr(cfg, ours)
        ]
        if bert.get("vocab_size", 0) > cfg.vocab_size:
            wrong.append(f"vocab_size={bert['vocab_size']} (preset: {cfg.vocab_size})")
        text = f"{folder / 'config.json'}: " + ("; ".join(wrong) if wrong else "the preset's shape")
        out.append(Finding(not wrong, text))
    return out


def sha256_prefix_finding(path: Path) -> Finding | None:
    """torchvision's names carry the first hex digits of the file's sha256; None if this one's doesn't."""
    match = HASH_IN_NAME.search(path.name)
    if not match:
        return None
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    digest, want = sha.hexdigest(), match.group(1)
    return Finding(digest.startswith(want), f"{path}: sha256 {digest[:12]}... (the name says {want})")


def check_cnn_weights(path: str | Path, cfg: PixelBertConfig, trunk_shapes: dict[str, torch.Size]) -> list[Finding]:
    """``trunk_shapes``: the preset's CNN trunk, ``{key: shape}`` (from a meta-device model)."""
    path = Path(path)
    if not path.is_file():
        return [Finding(False, f"model.cnn_weights={str(path)!r} does not exist")]
    out = []
    known = TORCHVISION_FILES.get(cfg.backbone, {})
    if known and path.name not in known:
        out.append(Finding(True, f"{path.name}: not one of torchvision's names {sorted(known)} (checked by keys)"))
    digest = sha256_prefix_finding(path)
    if digest is not None:
        out.append(digest)
    state = read_state_dict(path)
    wanted = {k: v for k, v in trunk_shapes.items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(wanted) - set(state))
    extra = sorted(k for k in state if k not in trunk_shapes and not k.startswith("fc.") and "num_batches" not in k)
    shapes = sorted(k for k in wanted if k in state and tuple(state[k].shape) != tuple(wanted[k]))
    gaps = (("missing", missing), ("not in the trunk", extra), ("wrong shape", shapes))
    problems = [f"{len(keys)} {name}, e.g. {keys[:3]}" for name, keys in gaps if keys]
    what = f"{path}: " + ("; ".join(problems) if problems else f"{len(wanted)} tensors of the {cfg.backbone} trunk")
    out.append(Finding(not problems, what))
    return out
