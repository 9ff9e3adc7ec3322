"""Run configuration: nested dataclasses, each module owning its own *Config.

A config is built from (1) the dataclass defaults, (2) an optional YAML file, and
(3) ``key=value`` overrides with dotted keys (``model.hidden_size=256``). Values are
parsed with YAML so ``lr=1e-4``, ``milestones=[25,35]`` and ``freeze=true`` all work.
An unknown key stops with an error naming it: a typo must never be silently ignored.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that cannot be applied."""


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _dataclass_of(tp) -> type | None:
    """The dataclass inside ``tp`` (also ``Optional[SomeConfig]``), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def _coerce_number(tp, value, key: str):
    """YAML 1.1 reads ``1e-4`` (no dot) as a string: accept it where a number is declared."""
    if not isinstance(value, str):
        return value
    wanted = {tp} | set(typing.get_args(tp))
    for number in (int, float):
        if number in wanted:
            try:
                return number(value)
            except ValueError:
                continue
    if float in wanted or int in wanted:
        raise ConfigError(f"config key {key!r}: {value!r} is not a number")
    return value


def from_dict(cls: type[T], data: dict | None, where: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict, refusing unknown keys."""
    data = dict(data or {})
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(f"unknown config key(s) {[where + k for k in unknown]}; "
                          f"valid keys under '{where or '<root>'}': {sorted(types_)}")
    kwargs = {}
    for name, value in data.items():
        sub = _dataclass_of(types_[name])
        if sub is not None and isinstance(value, dict):
            value = from_dict(sub, value, f"{where}{name}.")
        kwargs[name] = _coerce_number(types_[name], value, where + name)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    return key.strip().split("."), yaml.safe_load(raw) if raw != "" else ""


def _set_path(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {'.'.join(path)}: {part} is not a section")
    node[path[-1]] = value


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(cls: type[T], path: str | Path | None = None,
                overrides: Iterable[str] = ()) -> T:
    """Defaults <- YAML file <- key=value overrides, validated into ``cls``."""
    tree = to_dict(cls())
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping, not {type(loaded).__name__}")
        tree = _merge(tree, loaded)
        try:
            from_dict(cls, tree)
        except (ConfigError, TypeError) as err:
            raise ConfigError(f"{path}: {err}") from None
    for text in overrides:
        keys, value = _parse_override(text)
        _set_path(tree, keys, value)
    return from_dict(cls, tree)


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
