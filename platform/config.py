"""Typed configuration: dataclasses with defaults and docstrings, loaded from YAML and `--set key=value`.

Every config in raycraft is a dataclass. `from_dict` builds one from plain data (a YAML file), checking
each key and coercing each value to the declared type. A job's config (train, rl, a sweep's trials, a
scaling run's points) is built by one function, `build`, from its layers: the model's recipe, a YAML file,
flags and `--set` strings, all taking the same keys, routed by one rule (`route`) and merged by one deep
merge. Field documentation lives in each field's `metadata["help"]` via `field_doc`, so the CLI can print it
and errors can point at it. Errors are `UserError`s naming the key, the value and the choices.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from raycraft.errors import UserError, closest, invalid_choice
from raycraft.registry import ModelSpec, model_spec

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
        return _to_dataclass(key, value, tp)
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            raise invalid_choice(key, value, [str(c) for c in get_args(tp)])
        return value
    if origin in (tuple, list):
        return _to_sequence(key, value, tp)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"{key}: expected a mapping, got {value!r}.")
        return dict(value)
    if tp is Any:
        return value
    if tp in _SCALARS:
        return _SCALARS[tp](key, value)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise UserError(f"{key}: cannot use {value!r} as {tp}.")


def _to_dataclass(key: str, value: Any, tp: type) -> Any:
    if isinstance(value, tp):
        return value
    if not isinstance(value, dict):
        raise UserError(f"{key}: expected a mapping of {sorted(f.name for f in dataclasses.fields(tp))}, "
                        f"got {value!r}.")
    return from_dict(tp, value, prefix=f"{key}.")


def _to_sequence(key: str, value: Any, tp: Any) -> list | tuple:
    """A list or tuple of `tp`'s item type; a string (from `--set`) is read as a YAML list first."""
    if isinstance(value, str):
        value = read_yaml(value, key)
    if not isinstance(value, (list, tuple)):
        raise UserError(f"{key}: expected a list, got {value!r}.")
    args = get_args(tp)
    items = [coerce(f"{key}[{i}]", v, args[0] if args else Any) for i, v in enumerate(value)]
    return tuple(items) if get_origin(tp) is tuple else items


def _to_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise UserError(f"{key}: expected true or false, got {value!r}.")


def _to_int(key: str, value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{key}: expected an integer, got {value!r}.")
    return value


def _to_float(key: str, value: Any) -> float:
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


def _to_str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise UserError(f"{key}: expected a string, got {value!r}.")
    return value


_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


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
    return field_at(cls, key) is not None


def field_at(cls: type, key: str) -> tuple[dataclasses.Field, Any] | None:
    """The field that dotted `key` names in dataclass `cls` (descending into nested dataclasses) and its type,
    Optional removed (`data.data_dir` -> DataConfig's field, str); None when `cls` has no such field."""
    node: Any = cls
    found = None
    for part in key.split("."):
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            return None
        found, node = fields[part], _is_optional(_hints(node)[part])[1]
    return found, node


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    """One key of a config as `raycraft models --details` lists it."""

    key: str
    """Dotted from the config's top (`moe.experts`)."""
    default: Any
    choices: tuple[Any, ...]
    """What the field (or each of its items) takes, where that is enumerated (`choices_of`)."""
    help: str
    group: bool = False
    """A nested config: its own keys follow, and it has no value of its own to show."""


def choices_of(tp: Any) -> tuple[Any, ...]:
    """The values a field of type `tp` takes when they are enumerated: a Literal's (with None if Optional), or
    the items' of a list or tuple of a Literal (`fit: tuple[Matrix, ...]`); () for any other type."""
    optional, tp = _is_optional(tp)
    if get_origin(tp) in (list, tuple):
        return choices_of(get_args(tp)[0]) if get_args(tp) else ()
    return get_args(tp) + ((None,) if optional else ()) if get_origin(tp) is Literal else ()


def documented_keys(cls: type, defaults: Any = None, prefix: str = "") -> list[KeyDoc]:
    """Every key of config dataclass `cls`, a nested config's keys after it under its dotted name, each with
    its default (taken from `defaults`, an instance, where one is given: a nested config's field default may
    differ from its class's), its choices (from the field's Literal type) and its documentation."""
    defaults = cls() if defaults is None else defaults
    hints, out = _hints(cls), []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = _is_optional(hints[f.name])[1]
        value, doc = getattr(defaults, f.name), f.metadata.get("help", "")
        if dataclasses.is_dataclass(tp) and value is not None:
            out.append(KeyDoc(f"{prefix}{f.name}", None, (), doc, group=True))
            out += documented_keys(tp, value, f"{prefix}{f.name}.")
            continue
        out.append(KeyDoc(f"{prefix}{f.name}", value, choices_of(hints[f.name]), doc))
    return out


MODEL_ARGS = "model_args"  # the job field that holds its model's own keys
MAX_DEPTH = 32  # how deep a config's mappings may nest: real ones nest 3 deep (model_args.lora.rank)


class JobConfig:
    """What the configs of jobs (`TrainConfig`, `RLConfig`) share: a `model`, named in the registry, whose own
    keys sit in `model_args` as plain data (what config.yaml and the MLflow params `model_args.<key>` hold),
    and, as `model_config`, as the model's typed config dataclass. A subclass may change what lies under the
    user's keys (`layer_under`), which models fit its jobs (`registered_model`) and how errors name the
    model's keys (`model_prefix`)."""

    @classmethod
    def layer_under(cls, keys: dict[str, Any]) -> dict[str, Any]:
        """The layer under the keys the user gave (merged by `merge_layers`): the recipe of the model they name."""
        return model_spec(str(keys["model"])).recipe if "model" in keys else {}

    def registered_model(self) -> ModelSpec:
        return model_spec(self.model)

    def model_prefix(self) -> str:
        return f"{self.model}."

    @functools.cached_property
    def model_config(self) -> Any:
        """`model_args` as the model's typed config, validated on first use (`build` uses it) and kept: it
        travels with this config, pickled, to Ray Train workers and Tune trials."""
        model_cls = self.registered_model().config_cls
        self._check_misplaced_keys(model_cls)
        return from_dict(model_cls, self.model_args, prefix=self.model_prefix())

    def _check_misplaced_keys(self, model_cls: type) -> None:
        """A key routed to the model that looks like none of its keys but like one of the job's (`epoch: 3`)
        is a typo of the job's key: name both configs' keys, as a sweep's space check does."""
        model_names = [f.name for f in dataclasses.fields(model_cls) if f.init]
        job_names = [f.name for f in dataclasses.fields(self)]
        for key in self.model_args:
            if key not in model_names and not closest(key, model_names) and closest(key, job_names):
                raise invalid_choice("key", key, job_names + model_names)


J = TypeVar("J", bound=JobConfig)


def build(cls: type[J], layers: Iterable[dict[str, Any] | None], overrides: Iterable[str] = ()) -> tuple[J, Any]:
    """(job config, model config), validated, from a job's layers, lowest first: what `cls.layer_under` gives
    (the model's recipe), `layers` (say a resumed run's config.yaml, a YAML file, the flags given), then
    `--set key=value` strings. Every layer takes the same keys (`merge_layers`). The model's config is
    validated once, here; `cfg.model_config` keeps it and `cfg.model_args` holds it as plain data."""
    keys = merge_layers(cls, layers, overrides)
    tree = nest(cls, cls.layer_under(keys).items())
    deep_merge(tree, keys)
    cfg = from_dict(cls, tree)
    cfg.model_args = to_dict(cfg.model_config)
    return cfg, cfg.model_config


def merge_layers(cls: type, layers: Iterable[dict[str, Any] | None], overrides: Iterable[str] = ()) -> dict[str, Any]:
    """The keys a user gave a job of config class `cls`: `layers` (mappings, lowest first), then `--set`
    strings, as one nested mapping. Each layer takes the keys `--set` takes, dotted (`optim.lr: 0.005`) or
    nested (`optim: {lr: 0.005}`); a key whose head is not a field of `cls` is the model's (`route`). A
    mapping merges key by key into the one under it; any other value replaces what it lands on."""
    tree: dict[str, Any] = {}
    for pairs in [*((layer or {}).items() for layer in layers), map(parse_override, overrides)]:
        deep_merge(tree, nest(cls, pairs))
    return tree


def route(cls: type, key: str) -> str:
    """The path of `key` in a job of config class `cls`: a key whose head is not one of its fields is the
    model's, so model keys never need the prefix (`dropout` is `model_args.dropout`)."""
    return key if key.split(".")[0] in {f.name for f in dataclasses.fields(cls)} else f"{MODEL_ARGS}.{key}"


def nest(cls: type, pairs: Iterable[tuple[Any, Any]]) -> dict[str, Any]:
    """(key, value) pairs as one nested mapping of fresh dicts: each key routed, then split at its dots."""
    tree: dict[str, Any] = {}
    for key, value in pairs:
        path = route(cls, str(key))
        deep_merge(tree, _at(path, _split(path, value)))
    return tree


def _split(key: str, value: Any, depth: int = 0) -> Any:
    """`value` with its mappings copied and their dotted keys split: {'lora.rank': 8} -> {'lora': {'rank': 8}}."""
    if not isinstance(value, dict):
        return value
    if depth == MAX_DEPTH:
        raise UserError(f"{key}: mappings nested more than {MAX_DEPTH} deep; a config nests a few levels.")
    out: dict[Any, Any] = {}
    for k, v in value.items():
        sub = _split(f"{key}.{k}", v, depth + 1)
        deep_merge(out, _at(k, sub) if isinstance(k, str) else {k: sub})
    return out


def _at(path: str, value: Any) -> dict[str, Any]:
    """{'a': {'b': value}} for the path 'a.b'."""
    for part in reversed(path.split(".")):
        value = {part: value}
    return value


def deep_merge(tree: dict[Any, Any], top: dict[Any, Any]) -> None:
    """Merge `top` into `tree` in place, nested mappings key by key; what else `top` holds replaces what it
    lands on. Both are `nest`'s fresh dicts, so nothing the caller holds (a recipe, a preset) changes, and
    merging costs one step per key of `top`."""
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(tree.get(k), dict):
            deep_merge(tree[k], v)
        else:
            tree[k] = v


def check_keys(cls: type, model_cls: type, keys: Iterable[str]) -> None:
    """Reject routed `keys` that neither `cls` nor the model's config `model_cls` has, naming both configs'
    keys (a sweep checks its space this way before it starts)."""
    for key in keys:
        if not (has_path(cls, key) or has_path(model_cls, key.removeprefix(f"{MODEL_ARGS}."))):
            names = [f.name for f in dataclasses.fields(cls)] + [f.name for f in dataclasses.fields(model_cls)]
            raise invalid_choice("key", key, names)


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
