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
    ("bert.embeddings.", "embeddings."),
    ("embeddings.", "embeddings."),
    ("bert.encoder.", "encoder."),
    ("encoder.", "encoder."),
    ("bert.pooler.", "pooler."),
    ("pooler.", "pooler."),
    ("cls.predictions.transform.", "mlm_head.transform."),
    ("cls.predictions.bias", "mlm_head.bias"),
]
# The original BERT release (TF-converted bert-base-uncased files) names LayerNorm
# parameters gamma/beta; transformers renames them on load, and so do we.
_LEGACY_SUFFIXES = {".gamma": ".weight", ".beta": ".bias"}
# Keys a BERT checkpoint carries that have no counterpart here, by design.
_BERT_IGNORED = ("cls.seq_relationship.", "cls.predictions.decoder.", "position_ids")
# Heads a BERT checkpoint may lack as a whole, by its kind: BertModel files ship no MLM
# head (cls.predictions), BertForMaskedLM files no pooler. A head that is absent stays at
# its fresh init and is reported; a head present in part is an error like any other gap.
BERT_OPTIONAL_HEADS = {"pooler": ("pooler.",), "mlm_head": ("mlm_head.transform.", "mlm_head.bias")}
# Ours, never in a BERT file: the visual side, the ITM head, the tied decoder.
_NOT_FROM_BERT = ("visual.", "itm_head.", "mlm_head.decoder.")


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # ours, not in the file
    unexpected: list[str] = field(default_factory=list)  # the file's, unused
    heads_not_shipped: list[str] = field(default_factory=list)  # whole heads left at their init

    def __str__(self) -> str:
        heads = f"; heads not in the file (fresh init): {self.heads_not_shipped}" if self.heads_not_shipped else ""
        return (
            f"loaded {len(self.loaded)} tensors; missing {len(self.missing)}: {self.missing[:8]}"
            f"{' ...' if len(self.missing) > 8 else ''}; unexpected {len(self.unexpected)}: "
            f"{self.unexpected[:8]}{' ...' if len(self.unexpected) > 8 else ''}{heads}"
        )


def _refuse_gaps(path: Path, missing: list[str], unexpected: list[str], file_keys, hint: str) -> None:
    """A load that would leave expected tensors at their init is refused, keys named."""
    if missing:
        raise ValueError(
            f"{path}: {len(missing)} expected tensor(s) are not in the file: {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}; the file holds e.g. {sorted(file_keys)[:5]} "
            f"(unused: {unexpected[:5]}). {hint}"
        )


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
    raise FileNotFoundError(
        f"{directory} holds neither model.safetensors nor pytorch_model.bin: "
        "point model weights at a local Hugging Face BERT checkpoint directory"
    )


def _rename_bert_key(key: str) -> str | None:
    for old, new in _LEGACY_SUFFIXES.items():
        if key.endswith(old):
            key = key[: -len(old)] + new
    for old, new in _BERT_PREFIXES:
        if key.startswith(old):
            return new + key[len(old) :]
    return None


def _heads_not_shipped(missing: set[str], expected: set[str]) -> list[str]:
    """The optional heads of which the file has no tensor at all."""
    absent = []
    for head, prefixes in BERT_OPTIONAL_HEADS.items():
        keys = {k for k in expected if k.startswith(prefixes)}
        if keys and keys <= missing:
            absent.append(head)
    return absent


def _check_shapes(target: dict[str, torch.Tensor], source: dict[str, torch.Tensor], origin: str) -> None:
    for key, value in source.items():
        if target[key].shape != value.shape:
            raise ValueError(
                f"{origin}: tensor {key!r} has shape {tuple(value.shape)} but the model "
                f"expects {tuple(target[key].shape)}: wrong preset or checkpoint?"
            )


def _copy_into(target: dict[str, torch.Tensor], source: dict[str, torch.Tensor], origin: str) -> list[str]:
    """Copy matching tensors, all or none: a shape mismatch is refused, naming the key."""
    _check_shapes(target, source, origin)
    with torch.no_grad():
        for key, value in source.items():
            target[key].copy_(value)
    return sorted(source)


def load_bert_checkpoint(model: nn.Module, directory: str | Path) -> LoadReport:
    """Fill embeddings, transformer layers, pooler and the MLM head from a BERT checkpoint.

    Every text-side tensor must come from the file, except whole heads in
    ``BERT_OPTIONAL_HEADS`` that the file does not ship (reported in
    ``heads_not_shipped``); a key that names one of our modules but does not exist here
    (a deeper encoder, say) is refused too. Anything else is an error naming the keys."""
    path = _bert_file(Path(directory))
    ours = model.state_dict(keep_vars=True)
    expected = {k for k in ours if not k.startswith(_NOT_FROM_BERT)}
    source = read_state_dict(path)
    renamed, unexpected = {}, []
    for key, value in source.items():
        new = _rename_bert_key(key)
        if new in expected:
            renamed[new] = value
        elif not any(part in key for part in _BERT_IGNORED):
            unexpected.append(key)
    missing = expected - set(renamed)
    heads = _heads_not_shipped(missing, expected)
    gaps = sorted(k for k in missing if not any(k.startswith(BERT_OPTIONAL_HEADS[h]) for h in heads))
    _refuse_gaps(
        path,
        gaps,
        sorted(unexpected),
        source,
        "Expected a BERT checkpoint with Hugging Face "
        "(bert.* / embeddings.*) or original (gamma/beta) names and this model's shape.",
    )
    ours_named = sorted(k for k in unexpected if (_rename_bert_key(k) or "").startswith(("embeddings.", "encoder.")))
    if ours_named:
        raise ValueError(
            f"{path}: tensors {ours_named[:5]} have no place in this model (a checkpoint "
            f"with more layers or other modules than model.num_layers={len(model.encoder.layer)})"
        )
    report = LoadReport(
        loaded=_copy_into(ours, renamed, str(path)),
        missing=sorted(missing),
        unexpected=sorted(unexpected),
        heads_not_shipped=heads,
    )
    log.info("BERT weights from %s: %s", path, report)
    return report


def load_torchvision_backbone(model: nn.Module, path: str | Path) -> LoadReport:
    """Fill the CNN from a torchvision ResNet/ResNeXt weights file (the fc layer, the
    classifier head, is dropped). Every trunk tensor must be in the file, and every file
    tensor but fc.* must fit the trunk: another depth or family is refused, keys named."""
    path = Path(path)
    state = read_state_dict(path)
    backbone = model.visual.backbone.state_dict(keep_vars=True)
    matched = {k: v for k, v in state.items() if k in backbone}
    # FrozenBatchNorm2d has no num_batches_tracked, and a file saved from a live torchvision
    # model has one per BatchNorm (53 in a ResNet-50): a step counter, nothing a frozen
    # BatchNorm reads. Ignored where the trunk has no place for it; missing ones likewise.
    counters = [k for k in state if k.endswith("num_batches_tracked") and k not in backbone]
    unexpected = sorted(k for k in state if k not in backbone and not k.startswith("fc.") and k not in counters)
    missing = sorted(k for k in backbone if k not in matched and not k.endswith("num_batches_tracked"))
    _refuse_gaps(
        path,
        missing,
        unexpected,
        state,
        "Expected a torchvision weights file of this "
        "preset's trunk (keys like 'conv1.weight', 'layer1.0.bn1.running_mean').",
    )
    _check_shapes(backbone, matched, str(path))
    if unexpected:
        raise ValueError(
            f"{path}: tensors {unexpected[:5]} have no place in this model's CNN trunk "
            f"(model.backbone={model.config.backbone!r}): a file of another depth or family?"
        )
    report = LoadReport(loaded=_copy_into(backbone, matched, str(path)), missing=missing, unexpected=unexpected)
    ignored = f" ({len(counters)} BatchNorm num_batches_tracked counters ignored: frozen BatchNorm)" if counters else ""
    log.info("CNN weights from %s: %s%s", path, report, ignored)
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
        raise ValueError(
            f"{path}: not the visual side of this model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]} (a file from another preset?)"
        )
    report = LoadReport(loaded=_copy_into(ours, {k: v for k, v in state.items() if k in ours}, str(path)))
    log.info("visual weights from %s: %s", path, report)
    return report
