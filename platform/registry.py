"""The registries: model families, models and datasets. The CLI, Ray Train, Tune and RLlib resolve names
only here.

A family is one package of raycraft (`raycraft.<family>`) with the same shape: `step.py` holds the Step
that trains its task's models, and, where it has them, `plots.py` and `commands.py` (a typer `app` whose
commands the CLI mounts). `register_family(...)` at the end of this file is its one registration line.

A model registers a builder with `@register_model(name, family=..., config=ConfigClass, task=...)`;
`create_model(name, config, data)` builds it for a dataset's shapes. A dataset registers a loader with
`@register_dataset(name, task=...)`; `load_dataset(name, DataConfig)` returns its fixed splits.
Each model's `task` says which datasets it can train on and which training step drives it; a dataset
may serve several tasks (labelled images serve classification and generative models alike).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from raycraft.errors import UserError, invalid_choice
from raycraft.extras import require_extra

if TYPE_CHECKING:  # torch is imported only by the code that builds models
    from torch import nn

    from raycraft.data.base import DataConfig, DataSplits
    from raycraft.train.step import Step

# Modules that register models and datasets on import.
_MODEL_MODULES = ("raycraft.models",)
_DATASET_MODULES = ("raycraft.data.vision", "raycraft.data.tables", "raycraft.data.text",
                    "raycraft.data.timeseries", "raycraft.data.graphs")


@dataclass(frozen=True)
class FamilySpec:
    task: str
    """The task its models register with (`register_model(..., task=...)`); the family's Step trains them."""
    package: str
    """`raycraft.<family>`: `step.py` defines `STEP`, the Step class; `commands.py` (if any) an `app`."""
    commands: dict[str, str] = dataclasses.field(default_factory=dict)
    """The names and one-line help of the commands in `commands.py`, so `raycraft --help` lists them
    without importing the family's code (a test checks them against the commands' docstrings)."""
    extra: str | None = None
    """The raycraft extra its commands need, checked before they are imported (`pip install ...[extra]`)."""
    trains_with_loop: bool = True
    """False for a family trained by another framework (RLlib): it has commands but no Step."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    task: str
    description: str
    config_cls: type
    builder: Callable[..., nn.Module]
    recipe: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Trainer defaults that suit this model (epochs, optim.lr, ...); YAML and flags override them."""
    check: Callable[[Any, dict[str, Any]], None] | None = None
    """`check(config, data_info)` raises UserError when the model cannot be built for the dataset's shapes;
    run before Ray starts, on the info of the dataset that `runner.prepare` opens to validate it."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    tasks: tuple[str, ...]
    description: str
    loader: Callable[..., DataSplits]
    needs_data_dir: bool = False
    extra: str | None = None  # the raycraft extra whose packages the loader needs
    streams: bool = False
    """Whether Ray Data can stream it (`raycraft.data.streams` has its source): it is read from files."""

    @property
    def task(self) -> str:
        return ", ".join(self.tasks)


_FAMILIES: dict[str, FamilySpec] = {}
_MODELS: dict[str, ModelSpec] = {}
_DATASETS: dict[str, DatasetSpec] = {}


def field_doc(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Any = None,
              minimum: int | None = None) -> Any:
    """A dataclass field with its documentation attached (shown by `raycraft models --details`).
    `minimum` is the least value of an int field (or of each item of a list of ints), checked by `from_dict`;
    it overrides the rule for model configs' fields in `least_value`."""
    metadata = {"help": doc} if minimum is None else {"help": doc, "minimum": minimum}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def register_family(task: str, package: str, *, commands: dict[str, str] | None = None,
                    extra: str | None = None, trains_with_loop: bool = True) -> None:
    """Add the family in `package`, whose Step trains the models registered with `task`."""
    if task in _FAMILIES:
        raise ValueError(f"task {task!r} has a family already ({_FAMILIES[task].package})")
    _FAMILIES[task] = FamilySpec(task, package, dict(commands or {}), extra, trains_with_loop)


def families() -> dict[str, FamilySpec]:
    return dict(_FAMILIES)


def family(task: str) -> FamilySpec:
    if task not in _FAMILIES:
        raise invalid_choice("task", task, _FAMILIES)
    return _FAMILIES[task]


def step_for(task: str) -> Step:
    """A new instance of the Step that trains `task`'s models (its family's `step.STEP`)."""
    spec = family(task)
    if not spec.trains_with_loop:
        raise UserError(f"task: {task!r} models are not trained by raycraft's loop.")
    # Imported on demand: a family's Step pulls in torch and its own libraries, which `raycraft --help`,
    # `raycraft models` and bad input never need.
    return importlib.import_module(f"{spec.package}.step").STEP()


def register_model(name: str, *, family: str, config: type, task: str = "classification",
                   description: str = "", recipe: dict[str, Any] | None = None,
                   check: Callable[[Any, dict[str, Any]], None] | None = None) -> Callable:
    """Decorator for `builder(cfg, data_info) -> nn.Module`; the docstring's first paragraph describes it."""
    def wrap(builder: Callable) -> Callable:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        doc = description or first_paragraph(builder.__doc__)
        _MODELS[name] = ModelSpec(name, family, task, doc, config, builder, dict(recipe or {}), check)
        return builder
    return wrap


def register_dataset(name: str, *, task: str | tuple[str, ...] = "classification", needs_data_dir: bool = False,
                     description: str = "", extra: str | None = None, streams: bool = False) -> Callable:
    """Decorator for `loader(DataConfig) -> DataSplits`; the docstring's first paragraph describes it.
    `task` is one task or a tuple of the tasks whose models can train on this dataset."""
    def wrap(loader: Callable) -> Callable:
        if name in _DATASETS:
            raise ValueError(f"dataset {name!r} is registered twice")
        doc = description or first_paragraph(loader.__doc__)
        tasks = (task,) if isinstance(task, str) else tuple(task)
        _DATASETS[name] = DatasetSpec(name, tasks, doc, loader, needs_data_dir, extra, streams)
        return loader
    return wrap


def first_paragraph(doc: str | None) -> str:
    """A docstring's first paragraph on one line: the whole sentence a listing shows, however it was wrapped."""
    return " ".join(inspect.cleandoc(doc or "").split("\n\n")[0].split())


def _load(modules: tuple[str, ...]) -> None:
    for m in modules:
        importlib.import_module(m)


def models() -> dict[str, ModelSpec]:
    _load(_MODEL_MODULES)
    return dict(sorted(_MODELS.items()))


def datasets() -> dict[str, DatasetSpec]:
    _load(_DATASET_MODULES)
    return dict(sorted(_DATASETS.items()))


def model_spec(name: str) -> ModelSpec:
    specs = models()
    if name not in specs:
        raise invalid_choice("model", name, specs)
    return specs[name]


def dataset_spec(name: str) -> DatasetSpec:
    specs = datasets()
    if name not in specs:
        raise invalid_choice("dataset", name, specs)
    if specs[name].extra:
        require_extra(specs[name].extra, f"dataset {name!r}")
    return specs[name]


def check_compatible(model: str, dataset: str) -> None:
    m, d = model_spec(model), dataset_spec(dataset)
    if m.task not in d.tasks:
        fits = sorted(n for n, s in datasets().items() if m.task in s.tasks)
        raise UserError(f"dataset: {dataset!r} is a {d.task} dataset, but model {model!r} trains on "
                        f"{m.task} data. Datasets that fit: {', '.join(fits) or 'none'}.")


def create_model(name: str, config: Any = None, data_info: dict[str, Any] | None = None) -> nn.Module:
    """Build a registered model. `config` is its config dataclass (defaults if None); `data_info` holds
    the dataset's shapes, e.g. {'input_shape': (1, 8, 8), 'num_classes': 10}."""
    spec = model_spec(name)
    cfg = config if config is not None else spec.config_cls()
    if not isinstance(cfg, spec.config_cls):
        raise TypeError(f"{name} takes a {spec.config_cls.__name__}, got {type(cfg).__name__}")
    return spec.builder(cfg, dict(data_info or {}))


def load_dataset(name: str, cfg: DataConfig) -> DataSplits:
    spec = dataset_spec(name)
    if spec.needs_data_dir and not cfg.data_dir:
        raise UserError(f"--data-dir: dataset {name!r} reads your own files; pass --data-dir PATH.")
    splits = spec.loader(cfg)
    splits.keep_train_fraction(cfg.train_fraction)
    splits.info.setdefault("dataset", name)  # lets end-of-run metrics find the data again
    splits.info.setdefault("data_dir", cfg.data_dir)
    return splits


# The families: one line each.
register_family("rl", "raycraft.rl", extra="rl", trains_with_loop=False, commands={
    "rl": "Train ALGO on --env with RLlib; prints progress and the MLflow run id.",
    "rl-eval": "Reload RUN_ID's policy, play greedy episodes, report the mean return (and write a GIF)."})
register_family("classification", "raycraft.classification")
register_family("language-model", "raycraft.text", commands={
    "generate": "Print PROMPT continued by TOKENS tokens sampled from the model logged by RUN_ID.",
    "tokenizer": "Train and inspect BPE tokenizers."})
register_family("generative", "raycraft.generative", commands={
    "sample": "Draw --n samples from RUN_ID's generative model into a PNG grid; --metrics scores them."})
register_family("graph", "raycraft.graph", extra="ssm", commands={
    "oversmoothing": "Dirichlet energy of node states against depth, with and without residual links, logged to "
                     "MLflow."})
register_family("time-series", "raycraft.ssm")
