"""Typed configuration: dataclasses with defaults and docstrings, loaded from YAML and `--set key=value`.

Every config in raycraft is a dataclass. `from_dict` builds one from plain data (a YAML file), checking
each key and coercing each value to the declared type; `apply_overrides` applies `--set a.b=value`
strings on top. Field documentation lives in each field's `metadata["help"]` via `field_doc`, so the CLI
can print it and errors can point at it. Errors are `UserError`s naming the key, the value and the choices.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from raycraft.errors import UserError, invalid_choice

C = TypeVar("C")
MODEL_PACKAGE = "raycraft.models."  # whose config dataclasses `least_value` bounds by their defaults
MAX_YAML_BYTES = 1 << 20  # a config is a few KiB; 1 MiB still parses in about a second (libyaml)
MAX_YAML_VALUES = 100_000  # far above any config, far below what a few nested aliases expand to
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: faster, and caps nesting depth


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
            value = read_yaml(value, key)
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
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{key}: expected a number, got {value!r}.")
        if not math.isfinite(value):
            raise UserError(f"{key}: expected a finite number, got {value!r}.")
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
    for f in dataclasses.fields(cls):
        if f.name in kwargs:
            check_least(f"{prefix}{f.name}", kwargs[f.name], hints[f.name], least_value(cls, f))
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise UserError(f"{prefix or cls.__name__}: {exc}") from None


def least_value(cls: type, f: dataclasses.Field) -> int | None:
    """The least value of int field `f` of dataclass `cls` (or of each item, for a list of ints): its declared
    `minimum`; else, in a model config (`raycraft.models.*`), 1 when its default (or each default item) is at
    least 1, a size, and 0 when it is 0, which such fields document as "off". None: no bound."""
    if "minimum" in f.metadata:
        return f.metadata["minimum"]
    if not cls.__module__.startswith(MODEL_PACKAGE):
        return None
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    items = list(default) if isinstance(default, (list, tuple)) else [default]
    if not items or any(type(v) is not int for v in items) or min(items) < 0:
        return None
    return min(1, min(items))


def check_least(key: str, value: Any, tp: Any, least: int | None) -> None:
    """UserError naming `key` when int `value` (or an item of a list of ints) is below `least`."""
    tp = _is_optional(tp)[1]
    listed = get_origin(tp) in (list, tuple) and get_args(tp)[:1] == (int,)
    if least is None or value is None or not (tp is int or listed):
        return
    if any(v < least for v in (value if listed else [value])):
        what = "every item must be" if listed else "it must be"
        raise UserError(f"{key}: {list(value) if listed else value} is out of range; {what} an integer >= {least}.")


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
        value = read_yaml(raw, f"--set {key}") if raw.strip() else ""
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
    _check_size(f"--config {p}", p.stat().st_size)
    try:
        data = read_yaml(p.read_text(), f"--config {p}")
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"--config: {p} is not valid YAML{where}: {getattr(exc, 'problem', exc)}.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"--config: {p} must hold a mapping of keys to values, not {type(data).__name__}.")
    return data


def read_yaml(text: str, source: str) -> Any:
    """Config text as YAML data, bounded in size and in values with aliases expanded; `source` (a flag, file
    or key) names the text in the UserError. Malformed YAML raises yaml.YAMLError for the caller to word."""
    _check_size(source, len(text.encode()))
    data = yaml.load(text, Loader=_LOADER)
    if _values_over(data, MAX_YAML_VALUES):
        raise UserError(f"{source}: more than {MAX_YAML_VALUES:,} values once its YAML aliases (*name) are "
                        f"expanded, each alias counting as a copy of what it names; a config holds at most "
                        f"{MAX_YAML_VALUES:,}.")
    return data


def _check_size(source: str, size: int) -> None:
    if size > MAX_YAML_BYTES:
        raise UserError(f"{source}: {size:,} bytes of YAML, over the limit of {MAX_YAML_BYTES:,} bytes (1 MiB).")


def _values_over(data: Any, limit: int) -> bool:
    """Whether `data` holds more than `limit` values, a shared (aliased) object counting each time it is
    reached. Counts children before visiting them, so it stops early on a billion-laughs document or a cycle."""
    stack, count = [data], 1
    while stack:
        node = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        count += len(children)
        if count > limit:
            return True
        stack.extend(children)
    return False
