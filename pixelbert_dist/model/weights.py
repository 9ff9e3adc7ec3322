"""Load real weights from local files: a Hugging Face BERT checkpoint directory into the
text side, a torchvision weights file into the CNN. Nothing comes from a hub."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

log = logging.getLogger(__name__)

# Hugging Face key prefix -> our module prefix (first match wins).
_BERT_PREFIXES = [
    ("bert.embeddings.", "embeddings."), ("embeddings.", "embeddings."),
    ("bert.encoder.", "encoder."), ("encoder.", "encoder."),
    ("bert.pooler.", "pooler."), ("pooler.", "pooler."),
    ("cls.predictions.transform.", "mlm_head.transform."),
    ("cls.predictions.bias", "mlm_head.bias"),
]
# Keys a BERT checkpoint carries that have no counterpart here, by design.
_BERT_IGNORED = ("cls.seq_relationship.", "cls.predictions.decoder.", "position_ids")


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)     # ours, not in the file
    unexpected: list[str] = field(default_factory=list)  # the file's, unused

    def __str__(self) -> str:
        return (f"loaded {len(self.loaded)} tensors; missing {len(self.missing)}: {self.missing[:8]}"
                f"{' ...' if len(self.missing) > 8 else ''}; unexpected {len(self.unexpected)}: "
                f"{self.unexpected[:8]}{' ...' if len(self.unexpected) > 8 else ''}")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """safetensors, or a torch pickle read with weights_only=True (never arbitrary code)."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state


def _bert_file(directory: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{directory} holds neither model.safetensors nor pytorch_model.bin: "
                            "point model weights at a local Hugging Face BERT checkpoint directory")


def _rename_bert_key(key: str) -> str | None:
    for old, new in _BERT_PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return None


def _copy_into(target: dict[str, torch.Tensor], source: dict[str, torch.Tensor], origin: str) -> list[str]:
    """Copy matching tensors; a shape mismatch is refused, naming the key."""
    for key, value in source.items():
        if target[key].shape != value.shape:
            raise ValueError(f"{origin}: tensor {key!r} has shape {tuple(value.shape)} but the model "
                             f"expects {tuple(target[key].shape)}: wrong preset or checkpoint?")
    with torch.no_grad():
        for key, value in source.items():
            target[key].copy_(value)
    return sorted(source)


def load_bert_checkpoint(model: nn.Module, directory: str | Path) -> LoadReport:
    """Fill embeddings, transformer layers, pooler and (where present) the MLM head."""
    path = _bert_file(Path(directory))
    ours = model.state_dict(keep_vars=True)
    text_keys = {k for k in ours if not k.startswith(("visual.", "itm_head.", "mlm_head.decoder."))}
    renamed, unexpected = {}, []
    for key, value in read_state_dict(path).items():
        new = _rename_bert_key(key)
        if new in ours:
            renamed[new] = value
        elif not any(part in key for part in _BERT_IGNORED):
            unexpected.append(key)
    report = LoadReport(loaded=_copy_into(ours, renamed, str(path)), unexpected=sorted(unexpected))
    report.missing = sorted(text_keys - set(renamed))
    log.info("BERT weights from %s: %s", path, report)
    return report


def load_torchvision_backbone(model: nn.Module, path: str | Path) -> LoadReport:
    """Fill the CNN from a torchvision ResNet/ResNeXt weights file (the fc layer is dropped)."""
    path = Path(path)
    state = read_state_dict(path)
    backbone = model.visual.backbone.state_dict(keep_vars=True)
    matched = {k: v for k, v in state.items() if k in backbone}
    unexpected = sorted(k for k in state if k not in backbone and not k.startswith("fc."))
    if not matched:
        raise ValueError(f"{path}: no tensor matches the CNN trunk (expected torchvision ResNet keys "
                         f"like 'conv1.weight', got {sorted(state)[:5]})")
    # FrozenBatchNorm2d has no num_batches_tracked; a missing one in the file is harmless.
    missing = sorted(k for k in backbone if k not in matched and not k.endswith("num_batches_tracked"))
    report = LoadReport(loaded=_copy_into(backbone, matched, str(path)), missing=missing, unexpected=unexpected)
    log.info("CNN weights from %s: %s", path, report)
    return report


def load_visual_weights(model: nn.Module, path: str | Path) -> LoadReport:
    """Fill the whole visual side (CNN, projection, LayerNorm, s_v) from a file of
    ``visual.*`` tensors, such as the demo's warm start writes. Every visual tensor must be
    there: a partial file is a different model, refused with the keys named."""
    path = Path(path)
    state = read_state_dict(path)
    ours = {k: v for k, v in model.state_dict(keep_vars=True).items() if k.startswith("visual.")}
    missing = sorted(k for k in ours if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in ours)
    if missing or unexpected:
        raise ValueError(f"{path}: not the visual side of this model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]} (a file from another preset?)")
    report = LoadReport(loaded=_copy_into(ours, {k: v for k, v in state.items() if k in ours}, str(path)))
    log.info("visual weights from %s: %s", path, report)
    return report
