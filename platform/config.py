"""Typed configuration: dataclasses with defaults and docstrings, loaded from YAML and `--set key=value`.

Every config in raycraft is a dataclass. `from_dict` builds one from plain data (a YAML file), checking
each key and coercing each value to the declared type; `apply_overrides` applies `--set a.b=value`
strings on top. Field documentation lives in each field's `metadata["help"]` via `field_doc`, so the CLI
can print it and errors can point at it. Errors are `UserError`s naming the key, the value and the choices.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from raycraft.errors import UserError, invalid_choice

C = TypeVar("C")


def field_doc(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Any = None) -> Any:
    """A dataclass field with its documentation attached (shown by `raycraft models --details`)."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": doc})
    return dataclasses.field(default=default, metadata={"help": doc})


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_optional(tp: Any) -> tuple[bool, Any]:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert `value` to type `tp` or raise a UserError naming `key`."""
    optional, tp = _is_optional(tp)
    if value is None:
        if optional:
            return None
        raise UserError(f"{key}: a value is required (got null).")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise UserError(f"{key}: expected a mapping of {sorted(f.name for f in dataclasses.fields(tp))}, "
                            f"got {value!r}.")
        return from_dict(tp, value, prefix=f"{key}.")
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise invalid_choice(key, value, [str(c) for c in choices])
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key}: expected a list, got {value!r}.")
        args = get_args(tp)
        item_tp = args[0] if args else Any
        items = [coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"{key}: expected a mapping, got {value!r}.")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{key}: expected true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise UserError(f"{key}: expected an integer, got {value!r}.")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads '3e-4' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{key}: expected a number, got {value!r}.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{key}: expected a string, got {value!r}.")
        return value
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise UserError(f"{key}: cannot use {value!r} as {tp}.")


def from_dict(cls: type[C], data: dict[str, Any] | None, prefix: str = "") -> C:
    """Build dataclass `cls` from `data`, rejecting unknown keys and ill-typed values."""
    data = dict(data or {})
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in names]
    if unknown:
        raise invalid_choice(f"{prefix.rstrip('.') or 'config'}: unknown key", unknown[0], names)
    kwargs = {k: coerce(f"{prefix}{k}", v, hints[k]) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise UserError(f"{prefix or cls.__name__}: {exc}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, YAML-safe data for a dataclass (tuples become lists)."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v
    return plain(cfg)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 1e-3}} -> {'optim.lr': 1e-3}: the form MLflow params take."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """'optim.lr=3e-4' -> ('optim.lr', 0.0003). The value is read as YAML (numbers, booleans, lists)."""
    if "=" not in text:
        raise UserError(f"--set: expected key=value, got {text!r}.")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"--set: empty key in {text!r}.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_path(data: dict[str, Any], key: str, value: Any) -> None:
    """Set 'a.b.c' in nested dicts, creating the intermediate mappings."""
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        child = node.get(p)
        if not isinstance(child, dict):
            child = {}
            node[p] = child
        node = child
    node[parts[-1]] = value


def has_path(cls: type, key: str) -> bool:
    """Whether dotted `key` names a field of dataclass `cls` (descending into nested dataclasses)."""
    node: Any = cls
    for p in key.split("."):
        if not dataclasses.is_dataclass(node):
            return False
        hints = _hints(node)
        if p not in hints:
            return False
        node = _is_optional(hints[p])[1]
    return True


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, turning parse errors into UserErrors that name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config: file {str(p)!r} does not exist.")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"--config: {p} is not valid YAML{where}: {getattr(exc, 'problem', exc)}.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"--config: {p} must hold a mapping of keys to values, not {type(data).__name__}.")
    return data
