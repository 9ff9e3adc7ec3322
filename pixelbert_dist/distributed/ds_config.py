"""Fill a DeepSpeed JSON from the run config, refusing contradictions.

A DeepSpeed JSON in this project holds ZeRO and precision only. Batch size,
accumulation and clipping have one source of truth, the run config: where the JSON
says ``"auto"`` (or leaves the key out) it is filled in, as HF Trainer's DeepSpeed
integration does; where it holds a different concrete value the run stops with an
error naming the file, the key and both values. The optimiser and its schedule are
built in Python (``pixelbert_dist.train.optim``), so an ``optimizer`` or ``scheduler``
section is refused rather than silently fighting ours.

Settings this machine cannot honour fall back with a warning: fp16/bf16 where the
accelerator lacks them, NVMe offload where DeepSpeed's async_io op cannot build.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

from pixelbert_dist.config import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
_AUTO = "auto"
# deepspeed_configs/ at the top of a clone; inside the package in an installed wheel (setup.py)
_CLONE_CONFIGS = Path(__file__).resolve().parents[2] / "deepspeed_configs"
_WHEEL_CONFIGS = Path(__file__).resolve().parents[1] / "deepspeed_configs"
SHIPPED_DIR = _CLONE_CONFIGS if _CLONE_CONFIGS.is_dir() or not _WHEEL_CONFIGS.is_dir() else _WHEEL_CONFIGS
log = logging.getLogger(__name__)


def resolve_deepspeed_path(path: str | Path) -> Path:
    """``path`` itself when it is a file; a bare name that is not (``zero2.json``) is looked
    up among the shipped configs in ``deepspeed_configs/``, and the file used is logged."""
    path = Path(path)
    shipped = SHIPPED_DIR / path.name
    if path.is_file() or path.parent != Path(".") or not shipped.is_file():
        return path
    log.warning("DeepSpeed config %s is not a file here: using the shipped %s", path, shipped)
    return shipped


def load_deepspeed_json(ds: dict | str | Path, source: str | None = None) -> tuple[dict, str]:
    """The config as a fresh dict, and a name for it to use in messages."""
    if isinstance(ds, dict):
        return copy.deepcopy(ds), source or "<deepspeed config dict>"
    path = resolve_deepspeed_path(ds)
    source = source or str(path)
    if not path.is_file():
        shipped = ", ".join(sorted(p.name for p in SHIPPED_DIR.glob("*.json")))
        raise ConfigError(
            f"DeepSpeed config {source} does not exist (pass a path, or the name of a "
            f"shipped one in {SHIPPED_DIR}: {shipped})"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"DeepSpeed config {source} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config {source} must hold a JSON object, not {type(data).__name__}")
    return data, source


def _fill(ds: dict, key: str, wanted: Any, source: str, run_key: str) -> None:
    """``"auto"``/missing -> ``wanted``; an equal value stays; another value is an error."""
    value = ds.get(key, _AUTO)
    if value == _AUTO:
        ds[key] = wanted
        return
    same = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isclose(float(value), float(wanted), rel_tol=1e-9, abs_tol=0.0)
    )
    if not same:
        raise ConfigError(
            f'{source}: "{key}": {json.dumps(value)} contradicts the run config '
            f'({run_key}={wanted}). Set "{key}": "auto" in {source} (the run '
            f"config is the single source of truth) or change {run_key}."
        )


def _fill_batch(ds: dict, source: str, micro_batch: int, grad_accum: int, world_size: int, grad_clip: float) -> None:
    for name, value in (("micro_batch", micro_batch), ("grad_accum", grad_accum), ("world_size", world_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if not grad_clip >= 0:
        raise ConfigError(f"grad_clip must be >= 0 (0 disables clipping), got {grad_clip!r}")
    _fill(ds, "train_micro_batch_size_per_gpu", micro_batch, source, "micro_batch")
    _fill(ds, "gradient_accumulation_steps", grad_accum, source, "grad_accum")
    _fill(ds, "gradient_clipping", float(grad_clip), source, "grad_clip")
    total = micro_batch * grad_accum * world_size
    value = ds.get("train_batch_size", _AUTO)
    if value != _AUTO and value != total:
        raise ConfigError(
            f'{source}: "train_batch_size": {json.dumps(value)} != micro_batch x '
            f"grad_accum x world_size = {micro_batch} x {grad_accum} x {world_size} "
            f'= {total}. Set "train_batch_size": "auto" or change the run config.'
        )
    ds["train_batch_size"] = total


def _check_sections(ds: dict, source: str) -> None:
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(
                f'{source}: remove the "{section}" section. The optimiser (SGD for '
                f"the CNN, AdamW for the transformer) and the lr schedule are set in "
                f"the run config (optim.*, schedule.*), not in the DeepSpeed JSON."
            )
    if isinstance(ds.get("amp"), dict) and ds["amp"].get("enabled"):
        raise ConfigError(f'{source}: "amp" (NVIDIA apex) is not supported; use "bf16" or "fp16" instead')
    if ds.get("zero_allow_untested_optimizer", True) is not True:
        raise ConfigError(
            f'{source}: "zero_allow_untested_optimizer" must be true: ZeRO shards our own hybrid SGD/AdamW optimiser'
        )
    ds["zero_allow_untested_optimizer"] = True
    stage = ds.setdefault("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f'{source}: "zero_optimization.stage" must be 0, 1, 2 or 3, got {stage!r}')


def _accelerator_caps() -> dict[str, bool]:
    """What this machine can do (a function so tests can play another machine)."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops.op_builder import AsyncIOBuilder

    acc = get_accelerator()
    return {
        "fp16": bool(acc.is_fp16_supported()),
        "bf16": bool(acc.is_bf16_supported()),
        "aio": bool(AsyncIOBuilder().is_compatible(verbose=False)),
        "device": acc.device_name(),
    }


def _enabled(ds: dict, section: str) -> Any:
    node = ds.get(section)
    return node.get("enabled", False) if isinstance(node, dict) else False


def _set_precision(ds: dict, source: str, precision: str | None, caps: dict) -> None:
    fp16, bf16 = _enabled(ds, "fp16"), _enabled(ds, "bf16")
    if fp16 is True and bf16 is True:
        raise ConfigError(f'{source}: "fp16" and "bf16" are both enabled; enable one of them')
    if precision is None:
        # an "auto" in the JSON with no run-config choice means the project default, bf16
        precision = (
            "fp16" if fp16 is True else "bf16" if bf16 in (True, _AUTO) else ("fp16" if fp16 == _AUTO else "fp32")
        )
    elif precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    else:
        current = "fp16" if fp16 is True else "bf16" if bf16 is True else None
        if current is not None and current != precision:
            warnings.warn(f"{source} enables {current}; the run config asks {precision}, which wins", stacklevel=3)
    if precision in ("fp16", "bf16") and not caps[precision]:
        fallback = "bf16" if precision == "fp16" and caps["bf16"] else "fp32"
        warnings.warn(
            f"{source}: {precision} is not supported on this {caps['device']} accelerator; falling back to {fallback}",
            stacklevel=3,
        )
        precision = fallback
    for section in ("fp16", "bf16"):
        node = ds.get(section)
        if isinstance(node, dict) or section == precision:
            ds[section] = {**(node if isinstance(node, dict) else {}), "enabled": section == precision}
    if precision == "fp16":
        ds["fp16"].setdefault("loss_scale", 0)  # 0 = dynamic loss scaling


def _check_offload(ds: dict, source: str, caps: dict) -> None:
    zero = ds["zero_optimization"]
    offloading = False
    for key in ("offload_optimizer", "offload_param"):
        node = zero.get(key)
        if not isinstance(node, dict) or node.get("device", "none") == "none":
            continue
        offloading = True
        if node.get("device") == "nvme" and not caps["aio"]:
            warnings.warn(
                f'{source}: zero_optimization.{key}.device="nvme" needs DeepSpeed\'s '
                f"async_io op (libaio), which cannot be built here; offloading to "
                f'"cpu" instead',
                stacklevel=3,
            )
            zero[key] = {k: v for k, v in node.items() if not k.startswith(("nvme", "buffer"))}
            zero[key]["device"] = "cpu"
    if offloading:
        # DeepSpeed insists on its CPUAdam for offload unless told our optimiser is meant
        if ds.get("zero_force_ds_cpu_optimizer", False) is not False:
            raise ConfigError(
                f'{source}: "zero_force_ds_cpu_optimizer" must be false: the '
                f"offloaded optimiser is our hybrid SGD/AdamW, not DeepSpeedCPUAdam"
            )
        ds["zero_force_ds_cpu_optimizer"] = False


def fill_deepspeed_config(
    ds: dict | str | Path,
    *,
    micro_batch: int,
    grad_accum: int,
    world_size: int,
    grad_clip: float,
    precision: str | None = None,
    source: str | None = None,
) -> dict:
    """The DeepSpeed config to hand to ``deepspeed.initialize`` (a new dict).

    ``precision``: None keeps the JSON's choice; "fp32"/"bf16"/"fp16" overrides it
    (with a warning when the JSON enabled another one).
    """
    ds, source = load_deepspeed_json(ds, source)
    _check_sections(ds, source)
    _fill_batch(ds, source, micro_batch, grad_accum, world_size, grad_clip)
    caps = _accelerator_caps()
    _set_precision(ds, source, precision, caps)
    _check_offload(ds, source, caps)
    return ds


def precision_of(ds: dict) -> str:
    """ "bf16", "fp16" or "fp32" for a filled config (the dtype the inputs must have)."""
    if _enabled(ds, "bf16") is True:
        return "bf16"
    return "fp16" if _enabled(ds, "fp16") is True else "fp32"


def deepspeed_config_text(ds: dict) -> str:
    """The filled config as written into the run folder, so the run can be replayed."""
    return json.dumps(ds, indent=2, sort_keys=True) + "\n"


def write_deepspeed_config(ds: dict, path: str | Path) -> Path:
    """Write the filled config (e.g. into the run folder) so the run can be replayed."""
    path = Path(path)
    path.write_text(deepspeed_config_text(ds))
    return path
