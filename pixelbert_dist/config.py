"""Run configuration: nested dataclasses, each module owning its own *Config.

A config is built from (1) the dataclass defaults, (2) an optional YAML file, and
(3) ``key=value`` overrides with dotted keys (``model.hidden_size=256``). Values are
parsed with YAML so ``lr=1e-4``, ``milestones=[25,35]`` and ``freeze=true`` all work.
An unknown key stops with an error naming it: a typo must never be silently ignored;
a value of the wrong type (``train.compile=abc``, ``optim.betas=0.9``) stops with the
key, the declared type and the value; a value out of its field's bounds
(``train.save_every=-5``) with the key and the bound.

Every field says what it is where it is declared, and ``--help`` is built from that::

    save_every: Annotated[int, Help("optimiser steps between checkpoints; 0: at the end only"), Ge(0)] = 500

``Help`` is this module's marker; the bounds are ``annotated_types`` (``Ge``, ``Gt``,
``Interval``), which pydantic enforces; choices are a ``Literal``. tests/test_config.py
refuses a field without its own help.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that cannot be applied."""


@dataclasses.dataclass(frozen=True)
class Help:
    """A config field's help text, as ``Annotated`` metadata (pydantic ignores it)."""

    text: str


class EntryError(ValueError):
    """Raised by a validator that checks inside a mapping (``model.overrides``): ``entry``
    names the bad entry, so the error names ``model.overrides.<entry>``."""

    def __init__(self, entry: str, message: str):
        super().__init__(message)
        self.entry = entry


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def field_metadata(cls) -> dict[str, tuple]:
    """{field: its ``Annotated`` metadata (``Help``, bounds, validators)}; () for a bare type."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: getattr(hints[f.name], "__metadata__", ()) for f in dataclasses.fields(cls)}


def field_help(cls, name: str) -> str:
    """The ``Help`` text of field ``name`` of ``cls``; "" when it has none."""
    return next((m.text for m in field_metadata(cls)[name] if isinstance(m, Help)), "")


_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def bounds_text(metadata: tuple) -> str:
    """``>= 1``, ``> 0``, ``in [0, 1]`` from ``annotated_types`` bounds; "" when none."""
    found = {}
    for item in metadata:
        for name in _BOUNDS:
            if getattr(item, name, None) is not None:
                found[name] = getattr(item, name)
    low = next((k for k in ("ge", "gt") if k in found), None)
    high = next((k for k in ("le", "lt") if k in found), None)
    if low and high:
        return f"in {'[' if low == 'ge' else '('}{found[low]:g}, {found[high]:g}{']' if high == 'le' else ')'}"
    return ", ".join(f"{_BOUNDS[k]} {found[k]:g}" for k in found)


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
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def shown(value) -> str:
    """A value as one would type it after ``key=`` (YAML flow style)."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


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


def _describe(cls: type, error: dict, tree: dict, where: str) -> str:
    key, tp, value = _field_at(cls, error["loc"], tree)
    key, ctx = where + key, error.get("ctx", {})
    if error["type"] in ("int_parsing", "float_parsing"):
        return f"config key {key!r}: {value!r} is not a number (expected {type_name(tp)})"
    bound = next((name for name in _BOUNDS if name in ctx), None)
    if bound is not None:
        return f"{key}={shown(value)}: must be {_BOUNDS[bound]} {ctx[bound]:g}"
    if error["type"] == "literal_error":
        return f"{key}={value!r}: must be {type_name(tp)}"
    if isinstance(ctx.get("error"), EntryError):
        return f"{key}.{ctx['error'].entry}: {ctx['error']}"
    return f"config key {key!r}: expected {type_name(tp)}, got {value!r} ({error['msg']})"


@functools.cache
def _adapter(cls: type):
    import pydantic  # DeepSpeed's dependency; imported when a config is first checked

    return pydantic.TypeAdapter(cls)


def from_dict(cls: type[T], data: dict | None, where: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict: unknown keys are refused, and every
    value is checked against its declared type and bounds (pydantic, lax mode: ``"1e-4"``
    is a float, ``[0.9, 0.99]`` a tuple; ``"abc"`` is no bool, ``-5`` no ``Ge(0)``)."""
    import pydantic

    check_keys(cls, data, where)
    try:
        return _adapter(cls).validate_python(dict(data or {}))
    except pydantic.ValidationError as err:
        messages = dict.fromkeys(_describe(cls, e, data or {}, where) for e in err.errors())
        raise ConfigError("; ".join(messages)) from None


def check_fields(cfg, where: str = "") -> None:
    """Check a config made in Python (not by ``load_config``) against its fields' types and
    bounds, as ``load_config`` does; ``where``: its section's prefix (``"data."``)."""
    from_dict(type(cfg), to_dict(cfg), where)


def dotted_keys(tree: dict, prefix: str = "") -> dict:
    """A nested config tree as ``{"train.lr": value, ...}`` (an empty dict stays a value)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(dotted_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


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


# -- --help: every key, its type and bounds, its default and its field's Help -------------
@dataclasses.dataclass(frozen=True)
class KeyDoc:
    """One settable key: ``train.save_every``, its declared type, default, help and bounds."""

    key: str
    type: Any
    default: Any
    help: str
    bounds: str


def key_docs(cls: type, where: str = "", defaults=None) -> list[KeyDoc]:
    """Every leaf key of ``cls`` (nested dataclasses flattened to dotted keys), in order;
    ``defaults``: the instance whose values to show (a section's defaults may differ from
    its class's own: fine-tuning's optimiser)."""
    defaults, out = cls() if defaults is None else defaults, []
    metadata = field_metadata(cls)
    for name, tp in _field_types(cls).items():
        value = getattr(defaults, name)
        if _dataclass_of(tp) is not None and dataclasses.is_dataclass(value):
            out += key_docs(type(value), f"{where}{name}.", value)
        else:
            out.append(KeyDoc(where + name, tp, value, field_help(cls, name), bounds_text(metadata[name])))
    return out


def config_help(cls: type) -> list[str]:
    """One line per key: ``key=default  (type, bounds)  help``."""
    lines = []
    for doc in key_docs(cls):
        kind = ", ".join(filter(None, [type_name(doc.type), doc.bounds]))
        text = f"{f'  {doc.key}={shown(doc.default)}':<40} ({kind})"
        lines.append(f"{text}  {doc.help}" if doc.help else text)
    return lines


def entries_of(cls: type):
    """Validator metadata for a dict whose keys are fields of dataclass ``cls`` and whose
    values have those fields' types (``model.overrides``: PixelBertConfig fields), so a
    bad entry is refused at config time naming it, not when the model is built."""
    import pydantic

    def check(value: dict) -> dict:
        types_ = _field_types(cls)
        for key, item in value.items():
            if key not in types_:
                raise EntryError(key, f"not a field of {cls.__name__}; valid: {sorted(types_)}")
            try:
                value[key] = _adapter(types_[key]).validate_python(item)
            except pydantic.ValidationError:
                raise EntryError(f"{key}={item!r}", f"must be {type_name(types_[key])}") from None
        return value

    return pydantic.AfterValidator(check)
