"""Run configuration: nested dataclasses, each module owning its own *Config.

A config is built from (1) the dataclass defaults, (2) an optional YAML file, and
(3) ``key=value`` overrides with dotted keys (``model.hidden_size=256``). Values are
parsed with YAML so ``lr=1e-4``, ``milestones=[25,35]`` and ``freeze=true`` all work.
An unknown key stops with an error naming it: a typo must never be silently ignored;
a value of the wrong type (``train.compile=abc``, ``optim.betas=0.9``) stops with the
key, the declared type and the value.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import textwrap
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


def check_keys(cls: type, data: dict | None, where: str = "") -> None:
    """Refuse keys ``cls`` (a dataclass, nested ones too) does not have, naming the valid ones."""
    types_ = _field_types(cls)
    unknown = sorted(set(data or {}) - set(types_))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {[where + k for k in unknown]}; "
            f"valid keys under '{where or '<root>'}': {sorted(types_)}"
        )
    for name, value in (data or {}).items():
        sub = _dataclass_of(types_[name])
        if sub is not None and isinstance(value, dict):
            check_keys(sub, value, f"{where}{name}.")


def type_name(tp) -> str:
    """``tp`` as a reader would write it: ``list[str]``, ``one of 'fp32', 'bf16'``, ``int or null``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_name(a) for a in args)}]" if args else name
    return getattr(tp, "__name__", str(tp))


def _field_at(cls: type, loc: tuple, tree: dict) -> tuple[str, Any, Any]:
    """(dotted key, declared type, given value) of the field a pydantic error points at."""
    keys, tp, value = [], cls, tree
    for part in loc:
        sub = _dataclass_of(tp)
        if sub is None or not isinstance(part, str) or part not in _field_types(sub):
            break
        keys.append(part)
        tp = _field_types(sub)[part]
        value = value.get(part) if isinstance(value, dict) else None
    return ".".join(keys), tp, value


def _describe(cls: type, error: dict, tree: dict) -> str:
    key, tp, value = _field_at(cls, error["loc"], tree)
    if error["type"] in ("int_parsing", "float_parsing"):
        return f"config key {key!r}: {value!r} is not a number (expected {type_name(tp)})"
    return f"config key {key!r}: expected {type_name(tp)}, got {value!r} ({error['msg']})"


@functools.cache
def _adapter(cls: type):
    import pydantic  # DeepSpeed's dependency; imported when a config is first checked

    return pydantic.TypeAdapter(cls)


def from_dict(cls: type[T], data: dict | None, where: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict: unknown keys are refused, and every
    value is checked against its declared type (pydantic, lax mode: ``"1e-4"`` is a float,
    ``[0.9, 0.99]`` a tuple; ``"abc"`` is no bool and ``"embeddings"`` no list)."""
    import pydantic

    check_keys(cls, data, where)
    try:
        return _adapter(cls).validate_python(dict(data or {}))
    except pydantic.ValidationError as err:
        messages = dict.fromkeys(_describe(cls, e, data or {}) for e in err.errors())
        raise ConfigError("; ".join(messages)) from None


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


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
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
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    for text in overrides:
        keys, value = _parse_override(text)
        _set_path(tree, keys, value)
    return from_dict(cls, tree)


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(dump_config(cfg))


def dump_config(cfg) -> str:
    """The config as YAML, as ``--print-config`` shows it and the run folder keeps it."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# -- --help: every key, its type, its default and the comment beside its field ----------
def _comments_of(klass: type) -> dict[str, str]:
    """{field: comment} from the class source: the comment on a field's line (continued
    on the comment-only lines under it), or the comment lines just above the field."""
    try:
        lines = textwrap.dedent(inspect.getsource(klass)).splitlines()
    except (OSError, TypeError):  # no source (a frozen app, an interactive class)
        return {}
    names = {f.name for f in dataclasses.fields(klass)}
    out, above, last = {}, [], None
    for line in lines[1:]:
        field_match = re.match(r"    (\w+)\s*:", line)
        comment = re.match(r"\s*# ?(.*)$", line)
        if field_match and field_match.group(1) in names:
            last = field_match.group(1)
            inline = line.split("  # ", 1)[1].strip() if "  # " in line else ""
            out[last] = " ".join([*above, inline]).strip()
            above = []
        elif comment and line.startswith("     ") and last:
            out[last] = f"{out[last]} {comment.group(1).strip()}".strip()
        elif comment:
            above.append(comment.group(1).strip())
        else:
            above, last = [], None
    return out


def config_help(cls: type, where: str = "", defaults=None) -> list[str]:
    """One line per key of ``cls`` (nested dataclasses flattened to dotted keys):
    ``key=default  (type)  comment``; ``defaults``: the instance whose values to show
    (a section's defaults may differ from its class's own: fine-tuning's optimiser)."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            comments.update(_comments_of(klass))
    defaults, lines = cls() if defaults is None else defaults, []
    for name, tp in _field_types(cls).items():
        sub = _dataclass_of(tp)
        value = getattr(defaults, name)
        if sub is not None and dataclasses.is_dataclass(value):
            lines += config_help(type(value), f"{where}{name}.", value)
            continue
        text = f"  {where}{name}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
        text = f"{text:<40} ({type_name(tp)})"
        lines.append(f"{text}  {comments[name]}" if comments.get(name) else text)
    return lines
