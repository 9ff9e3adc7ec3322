"""The fine-tuning hand-off: a folder with config.json, model.safetensors and the
tokenizer files, loadable with no DeepSpeed and no pickle.

config.json records the sha256 and size of every weight file; loading checks them first,
so a truncated or overwritten file is refused with its name instead of loading garbage.
The weights file in turn carries the model config it was exported with (safetensors
metadata): config.json's own description is covered through the weights' checksum, and
an edit that keeps tensor shapes (another preset name, ``num_heads``, ``extra_pool``) is
refused naming the keys instead of fine-tuning a different model. An export without a
checksum table (older ones) is refused unless the caller passes ``allow_unverified=True``.
The weights are written before config.json: an export interrupted half-way fails that
check rather than pairing new weights with an old description.

This module knows the model only as ``nn.Module`` with a ``config`` (PixelBert imports it,
never the other way round): the class to build is passed in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_file
from torch import nn

from pixelbert_dist.config import dotted_keys

from .config import PixelBertConfig

log = logging.getLogger(__name__)
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
FILE_MODE = 0o644  # every exported file alike: readable by the fine-tuning job's user
CONFIG_METADATA = "pixelbert_config"  # the exported model config, inside the weights file


def file_digest(path: Path) -> dict:
    """{"sha256": hex, "bytes": size} of one file, read in 1 MiB blocks."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return {"sha256": sha.hexdigest(), "bytes": path.stat().st_size}


def fp32_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """fp32 CPU copies of the weights, the caller's model untouched. A tied tensor (the
    MLM decoder shares the word embeddings) is stored once, under its first name in sorted
    order, as safetensors' ``save_model`` does; ``load_model`` restores the tie."""
    state, seen = {}, set()
    for name, tensor in sorted(model.state_dict().items()):
        storage = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if storage in seen:
            continue
        seen.add(storage)
        tensor = tensor.detach().to("cpu")
        state[name] = (tensor.float() if tensor.is_floating_point() else tensor).contiguous()
    return state


def _tokenizer_record(tokenizer, out: Path) -> tuple[dict, list[Path]]:
    """Write the tokenizer (plus vocab.txt: transformers 5 writes only tokenizer.json and
    BERT readers expect it); return its description for config.json and the files written."""
    files = [Path(f) for f in tokenizer.save_pretrained(str(out))]
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    (out / "vocab.txt").write_text("".join(token + "\n" for token, _ in vocab))
    record = {
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "do_lower_case": getattr(tokenizer, "do_lower_case", None),
    }
    return record, files + [out / "vocab.txt"]


def save_pretrained(model: nn.Module, out_dir: str | Path, tokenizer=None, extra: dict | None = None) -> Path:
    """Write the tokenizer, fp32 weights (carrying config.json's description), then
    config.json with the weights' sha256.

    ``extra`` adds top-level entries to config.json (the pre-training export puts the
    preset name, the image and text input settings and the checkpoint there)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"architecture": "PixelBert", "config": dataclasses.asdict(model.config), **(extra or {})}
    written = []
    if tokenizer is not None:
        config["tokenizer"], written = _tokenizer_record(tokenizer, out)
    described = json.dumps(config, sort_keys=True, default=str)  # all of config.json but the checksums
    save_file(fp32_state_dict(model), str(out / WEIGHTS_NAME), metadata={"format": "pt", CONFIG_METADATA: described})
    written.append(out / WEIGHTS_NAME)
    config["files"] = {WEIGHTS_NAME: file_digest(out / WEIGHTS_NAME)}
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    for path in written + [out / CONFIG_NAME]:
        if path.is_file():
            os.chmod(path, FILE_MODE)
    return out


def read_pretrained_record(folder: str | Path) -> dict:
    """The whole config.json of an export folder, checked to describe a PixelBert."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {folder} is not a pixelbert_dist export folder")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}): a damaged export") from None
    if not isinstance(data, dict) or data.get("architecture") != "PixelBert" or "config" not in data:
        raise ValueError(
            f"{path} does not describe a PixelBert export (architecture="
            f"{data.get('architecture') if isinstance(data, dict) else None!r})"
        )
    return data


def read_pretrained_config(folder: str | Path) -> PixelBertConfig:
    return PixelBertConfig(**read_pretrained_record(folder)["config"])


def verify_export_files(folder: str | Path, record: dict, allow_unverified: bool = False) -> None:
    """Check every weight file against the size and sha256 that config.json records."""
    folder = Path(folder)
    files = record.get("files")
    if not files:
        if not allow_unverified:
            raise ValueError(
                f"{folder / CONFIG_NAME} records no checksums (an export from before they were written): "
                f"{WEIGHTS_NAME} cannot be verified. Re-export it from its checkpoint (python launch/export.py "
                "RUN_DIR), or pass allow_unverified=True (the fine-tuning and evaluation commands: "
                "--allow-unverified-weights) to load it anyway"
            )
        log.warning("%s records no checksums: %s is loaded unverified", folder / CONFIG_NAME, WEIGHTS_NAME)
        return
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing (listed in {folder / CONFIG_NAME})")
        have = file_digest(path)
        if have["bytes"] != want["bytes"]:
            raise ValueError(
                f"{path} has {have['bytes']} bytes, config.json records {want['bytes']}: "
                "the file is truncated or was replaced; re-export or copy it again"
            )
        if have["sha256"] != want["sha256"]:
            raise ValueError(
                f"{path} does not match the sha256 in config.json ({have['sha256'][:12]}... vs "
                f"{want['sha256'][:12]}...): its bytes changed since the export; re-export "
                "or copy it again"
            )


def check_architecture(weights: Path, record: dict) -> None:
    """What config.json says (the model config, preset, input settings) must be what the
    weights were exported with (recorded inside the weights file, which the checksum covers)."""
    with safe_open(str(weights), "pt") as handle:
        described = (handle.metadata() or {}).get(CONFIG_METADATA)
    if described is None:
        return  # an export from before config.json was recorded in its weights
    exported = dotted_keys(json.loads(described))
    claimed = dotted_keys(json.loads(json.dumps({k: v for k, v in record.items() if k != "files"}, default=str)))
    changed = [
        f"{key}: {claimed.get(key)!r} in config.json, {exported.get(key)!r} in the weights"
        for key in sorted(set(exported) | set(claimed))
        if exported.get(key) != claimed.get(key)
    ]
    if changed:
        raise ValueError(
            f"{weights.parent / CONFIG_NAME} describes another model than {weights} was exported with "
            f"({'; '.join(changed)}): config.json was edited after the export; restore it or re-export"
        )


def load_pretrained(
    build: Callable[[PixelBertConfig], nn.Module],
    folder: str | Path,
    map_location: str | torch.device = "cpu",
    allow_unverified: bool = False,
    **overrides,
) -> nn.Module:
    """``build(config)`` filled from an export folder, verified, in eval mode (as Hugging
    Face's from_pretrained returns it). ``overrides`` change execution settings such as
    pixel_sample_size or attn_implementation (shapes must match the weights)."""
    record = read_pretrained_record(folder)
    cfg = PixelBertConfig(**record["config"]).replace(**overrides)
    weights = Path(folder) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing")
    verify_export_files(folder, record, allow_unverified)
    check_architecture(weights, record)
    model = build(cfg)
    try:
        load_model(model, str(weights), strict=True, device=str(map_location))
    except Exception as err:  # safetensors' own errors name no file
        raise ValueError(f"{weights} does not fit the model its config.json describes: {err}") from None
    return model.to(map_location).eval()
