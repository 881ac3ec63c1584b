"""A sweep file: the base job, a search space over its keys, how to search and when to stop trials.

    name: lenet_digits                 # Tune experiment name: `--resume NAME` continues it
    job: {model: lenet5, dataset: digits, epochs: 2}   # exactly a `raycraft train --config` file
                                       # (or a `raycraft rl --config` file: {algo: dqn, env: CartPole-v1})
    space:                             # dotted or nested keys of the job; model keys need no prefix
      optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
      dropout: {uniform: [0.0, 0.5]}
      optim: {name: {choice: [adam, adamw]}}
    search: random                     # random | grid | optuna (TPE) | hyperopt
    scheduler: {name: asha, grace_period: 1, reduction_factor: 2}   # fifo | asha | hyperband | pbt
                                       # (times count epochs, or RLlib iterations for an rl job;
                                       # pbt: train jobs, {name: pbt, perturbation_interval: 2})
    metric: val_accuracy
    mode: max
    samples: 4
    concurrency: 1
    resources: {workers: 1, cpus_per_worker: 1, gpu: false}   # per trial

A sweep may instead (or as well) list `points`, job overrides one trial each: the space gets the key
`point`, a grid over their indices, and a trial lays its point over the job before its sampled values.
`raycraft scaling` runs its grid of model sizes x data amounts this way.

Everything is checked by `load_sweep` before Ray starts: unknown names, keys the job lacks, bounds that
are not numbers or are in the wrong order, `loguniform` bounds <= 0, values the job would reject, and a
metric the job never reports.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from raycraft.config import check_keys, from_dict, load_yaml, merge_layers, parse_override, set_path
from raycraft.errors import UserError, invalid_choice
from raycraft.extras import require_extra
from raycraft.registry import field_doc
from raycraft.sweep.jobs import JobKind, kind_of
from raycraft.sweep.probe import parameter_shapes
from raycraft.train.config import TrainConfig

DOMAINS = ("choice", "grid", "uniform", "loguniform", "randint")
SEARCHES = ("random", "grid", "optuna", "hyperopt")
SCHEDULERS = ("fifo", "asha", "hyperband", "pbt")
POINT = "point"
"""The space key of a sweep's `points`: a grid over their indices."""


@dataclass
class SchedulerConfig:
    """When to stop trials early (ASHA, HyperBand), or how to evolve them (PBT). Times count epochs (RL jobs:
    training iterations)."""

    name: str = field_doc("fifo", "fifo (run every trial to the end), asha, hyperband or pbt "
                                  "(population-based training, Jaderberg et al. 2017; train jobs).")
    grace_period: int = field_doc(1, "ASHA: epochs every trial runs before it can be stopped.")
    reduction_factor: float = field_doc(2.0, "ASHA/HyperBand: keep 1/reduction_factor of trials per rung.")
    perturbation_interval: int = field_doc(2, "PBT: epochs between a trial's exploit/explore steps.")
    quantile_fraction: float = field_doc(0.25, "PBT: a trial in the bottom fraction (by the metric) takes over "
                                               "the weights of one in the top fraction.")
    resample_probability: float = field_doc(0.25, "PBT explore: chance to draw a hyperparameter afresh from "
                                                  "its space instead of scaling the donor's value by 0.8 or 1.2.")

    def __post_init__(self) -> None:
        if self.name not in SCHEDULERS:
            raise invalid_choice("scheduler.name", self.name, SCHEDULERS)
        if self.grace_period < 1:
            raise UserError(f"scheduler.grace_period: {self.grace_period} must be at least 1.")
        if self.reduction_factor <= 1:
            raise UserError(f"scheduler.reduction_factor: {self.reduction_factor} must be > 1.")
        if self.perturbation_interval < 1:
            raise UserError(f"scheduler.perturbation_interval: {self.perturbation_interval} must be at least 1.")
        if not 0 < self.quantile_fraction <= 0.5:
            raise UserError(f"scheduler.quantile_fraction: {self.quantile_fraction} must be in (0, 0.5].")
        if not 0 <= self.resample_probability <= 1:
            raise UserError(f"scheduler.resample_probability: {self.resample_probability} must be in [0, 1].")


@dataclass
class ResourcesConfig:
    """Per trial; each value left null keeps the job's own."""

    workers: int | None = field_doc(None, "Ray Train workers of each trial (RL jobs: EnvRunner actors).")
    cpus_per_worker: int | None = field_doc(None, "CPUs per worker (train jobs).")
    gpu: bool | None = field_doc(None, "One GPU per worker (train jobs).")


@dataclass
class SweepConfig:
    name: str = field_doc("", "Tune experiment name (default: the file's stem); `--resume NAME` continues it.")
    job: dict[str, Any] = field_doc(doc="The base job: a `raycraft train` config (model, dataset, epochs, ...) "
                                        "or a `raycraft rl` config (algo, env, timesteps, ...).", factory=dict)
    space: dict[str, Any] = field_doc(doc="Search space: key -> {choice|grid|uniform|loguniform|randint: ...}.",
                                      factory=dict)
    points: list[dict[str, Any]] = field_doc(doc="Job overrides, one trial each (search grid or random): the "
                                                 f"space gains `{POINT}`, a grid over their indices.", factory=list)
    search: str = field_doc("random", "random, grid, optuna (Bayesian, TPE) or hyperopt (TPE).")
    scheduler: SchedulerConfig = field_doc(doc="Trial scheduler.", factory=SchedulerConfig)
    metric: str = field_doc("val_loss", "Reported metric that ranks trials.")
    mode: Literal["min", "max"] = field_doc("min", "Minimise or maximise the metric.")
    samples: int = field_doc(4, "Trials to sample (grid: repeats of the whole grid).")
    concurrency: int = field_doc(1, "Trials running at once (each needs workers x cpus_per_worker CPUs). "
                                    "pbt: the whole population starts at once as resources allow; trials "
                                    "that do not fit take turns at each perturbation.")
    resources: ResourcesConfig = field_doc(doc="Per-trial resources.", factory=ResourcesConfig)
    plot_metrics: list[str] = field_doc(doc="More metrics to plot against each hyperparameter on the parent run "
                                             "(test_* allowed: e.g. test_loss for double descent).", factory=list)
    seed: int = field_doc(0, "Seed of the search algorithm.")
    experiment: str = field_doc("raycraft-sweeps", "MLflow experiment of the parent and child runs.")
    storage_path: str = field_doc("ray_results", "Folder of Tune's experiment state (one subfolder per sweep).")

    def __post_init__(self) -> None:
        if self.search not in SEARCHES:
            raise invalid_choice("search", self.search, SEARCHES)
        if self.search in ("optuna", "hyperopt"):
            require_extra("tune", f"search: {self.search}")
        if self.samples < 1 or self.concurrency < 1:
            raise UserError("samples and concurrency must be at least 1.")
        if POINT in self.space:
            raise UserError(f"space.{POINT}: the key is the index of the sweep's `points`; rename it.")
        if not self.space and not self.points:
            raise UserError("space: the sweep has no search space; add at least one key, e.g. "
                            "`optim.lr: {loguniform: [1.0e-4, 1.0e-2]}`.")


@dataclass(frozen=True)
class Domain:
    """One hyperparameter's range: `kind` in DOMAINS, `values` (choice, grid) or (low, high) bounds."""

    kind: str
    values: tuple[Any, ...]

    def tune(self) -> Any:
        from ray import tune  # deferred: Ray takes seconds to import; sweep files are checked without it

        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        return getattr(tune, self.kind)(*self.values)

    def examples(self) -> list[Any]:
        """Values that exercise the job's validation: every option, or both ends of a range."""
        if self.kind == "randint":
            return [self.values[0], self.values[1] - 1]
        return list(self.values)


def flatten_space(space: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings become dotted keys; a one-key mapping to a list ({uniform: [0, 1]}) is a leaf."""
    out: dict[str, Any] = {}
    for k, v in space.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not (len(v) == 1 and not isinstance(next(iter(v.values())), dict)):
            if not v:
                raise UserError(f"space.{key}: empty mapping; give a domain such as {{choice: [...]}}.")
            out.update(flatten_space(v, f"{key}."))
        else:
            out[key] = v
    return out


def _number(key: str, v: Any, integer: bool = False) -> float:
    if isinstance(v, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
        try:
            v = float(v)
        except ValueError:
            pass
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not float(v).is_integer()):
        raise UserError(f"space.{key}: bound {v!r} is not {'an integer' if integer else 'a number'}.")
    return int(v) if integer else float(v)


def parse_domain(key: str, spec: Any) -> Domain:
    if not (isinstance(spec, dict) and len(spec) == 1):
        raise UserError(f"space.{key}: expected one of {{{' | '.join(DOMAINS)}: ...}}, got {spec!r}.")
    kind, arg = next(iter(spec.items()))
    if kind not in DOMAINS:
        raise invalid_choice(f"space.{key}", kind, DOMAINS)
    if kind in ("choice", "grid"):
        if not isinstance(arg, list) or not arg:
            raise UserError(f"space.{key}: {kind} takes a non-empty list of values, got {arg!r}.")
        return Domain(kind, tuple(arg))
    if not isinstance(arg, list) or len(arg) != 2:
        raise UserError(f"space.{key}: {kind} takes [low, high], got {arg!r}.")
    low, high = (_number(key, v, integer=kind == "randint") for v in arg)
    if low >= high:
        raise UserError(f"space.{key}: {kind} needs low < high, got [{low}, {high}].")
    if kind == "loguniform" and low <= 0:
        raise UserError(f"space.{key}: loguniform bounds must be > 0 (log of {low} is undefined).")
    return Domain(kind, (low, high))


@dataclass
class Sweep:
    """A validated sweep: its config, the job every trial starts from, and the parsed space."""

    config: SweepConfig
    job: dict[str, Any]
    space: dict[str, Domain]
    length: int
    """Tune iterations of a trial that runs to its end: epochs, or RLlib iterations."""

    @property
    def kind(self) -> JobKind:
        return kind_of(self.job)

    def key(self, key: str) -> str:
        return self.kind.key(key)

    def trial_job(self, params: dict[str, Any]) -> dict[str, Any]:
        """The base job with one trial's point (if the sweep has points) and sampled values set."""
        sampled = {k: v for k, v in params.items() if k != POINT}
        point = [self.config.points[params[POINT]]] if POINT in params else []
        return merge_layers(self.kind.config_cls, [self.job, *point, sampled])

    def param_space(self) -> dict[str, Any]:
        return {k: d.tune() for k, d in self.space.items()}


def split_overrides(overrides: list[str]) -> tuple[list[tuple[str, Any]], list[str]]:
    """`--set` keys whose head is a sweep field change the sweep; all others change the job."""
    names = {f.name for f in dataclasses.fields(SweepConfig)}
    sweep, job = [], []
    for text in overrides:
        key, value = parse_override(text)
        if key.split(".")[0] in names:
            sweep.append((key, value))
        else:
            job.append(text)
    return sweep, job


def load_sweep(path: str | Path | None = None, overrides: list[str] = (), samples: int | None = None,
               data: dict[str, Any] | None = None) -> Sweep:
    """Read, override and validate a sweep file (or an already-read mapping `data`)."""
    cfg, job_sets = read_sweep(path, list(overrides), samples, data)
    kind = kind_of(cfg.job)
    job = base_job(cfg, kind, job_sets)
    base, model_cfg = kind.build(job)
    kind.check(base, model_cfg)
    space = {k: parse_domain(k, v) for k, v in flatten_space(cfg.space).items()}
    check_keys(kind.config_cls, type(model_cfg), [kind.key(k) for k in space])
    if cfg.points:
        space[POINT] = Domain("grid", tuple(range(len(cfg.points))))
    sweep = Sweep(cfg, job, space, kind.length(base))
    check_values(sweep)
    check_search(cfg, space)
    check_metric(cfg, *kind.metrics(base))
    check_epoch_reports(base)
    if cfg.scheduler.name == "pbt":
        check_pbt(sweep, base)
    return sweep


def check_epoch_reports(base: Any) -> None:
    """A trial reports to Tune once per epoch, and Tune's schedulers count those reports as its iterations; a
    mid-epoch checkpoint is a report too, so a sweep's trials checkpoint at epoch ends only."""
    for name in ("checkpoint_every_steps", "checkpoint_every_minutes"):
        if getattr(base, name, 0):
            raise UserError(f"{name}: {getattr(base, name)}: a sweep's schedulers count each report as an "
                            f"iteration, so its trials checkpoint once per epoch; drop {name} (0) from the job.")


def read_sweep(path: str | Path | None, overrides: list[str], samples: int | None,
               data: dict[str, Any] | None) -> tuple[SweepConfig, list[str]]:
    """The sweep's own config, with the `--set` strings for its fields applied, and the rest, the job's."""
    raw = copy.deepcopy(data) if data is not None else load_yaml(path)
    sweep_sets, job_sets = split_overrides(overrides)
    for key, value in sweep_sets:
        set_path(raw, key, value)
    if samples is not None:
        raw["samples"] = samples
    if path is not None and not raw.get("name"):
        raw["name"] = Path(path).stem
    cfg = from_dict(SweepConfig, raw)
    if not cfg.name:
        raise UserError("name: the sweep needs a name (it names the Tune experiment to resume).")
    return cfg, job_sets


def base_job(cfg: SweepConfig, kind: JobKind, job_sets: list[str]) -> dict[str, Any]:
    """The job every trial starts from, as nested keys: the file's job, its `--set` strings, then `resources`."""
    if any(k not in cfg.job for k in kind.required):
        raise UserError("job: name a model and a dataset (a `raycraft train --config` job) or an algo and an env "
                        "(a `raycraft rl --config` job).")
    resources = {}
    for name in ("workers", "cpus_per_worker", "gpu"):
        value = getattr(cfg.resources, name)
        if value is not None and name not in kind.resource_keys:
            raise UserError(f"resources.{name}: {kind.name} jobs have no such resource (they take "
                            f"{', '.join(kind.resource_keys)}).")
        if value is not None:
            resources[name] = value
    return merge_layers(kind.config_cls, [cfg.job], job_sets) | resources


def check_values(sweep: Sweep) -> None:
    """Every value a domain can give (each option, both ends of a range) must make a valid job."""
    for key, domain in sweep.space.items():
        for value in domain.examples():
            try:
                sweep.kind.build(sweep.trial_job({key: value}))
            except UserError as exc:
                where = (f"points[{value}] {sweep.config.points[value]}" if key == POINT
                         else f"space.{key}: value {value!r}")
                raise UserError(f"{where} is not valid for the job: {exc}") from None


def check_pbt(sweep: Sweep, base: TrainConfig) -> None:
    """PBT hands a trial another trial's Ray Train checkpoint, then perturbs its hyperparameters: it needs a
    train job, Tune's own sampling, and a space whose values all fit the same weights."""
    cfg = sweep.config
    if sweep.kind.name != "train":
        raise UserError(f"scheduler.name: pbt clones trials' Ray Train checkpoints, so it runs train jobs; this "
                        f"sweep's job is an {sweep.kind.name} job. Use asha, hyperband or fifo.")
    if cfg.search not in ("random", "grid"):
        raise UserError(f"search: pbt explores by perturbing its population, so it samples the starting points "
                        f"itself; use search random or grid, not {cfg.search!r}.")
    if cfg.scheduler.perturbation_interval >= sweep.length:
        raise UserError(f"scheduler.perturbation_interval: {cfg.scheduler.perturbation_interval} epochs is not "
                        f"less than the job's {sweep.length} epochs, so no trial would ever be perturbed.")
    shapes = parameter_shapes(base)
    for key, domain in sweep.space.items():
        for value in domain.examples():
            other = parameter_shapes(sweep.kind.build(sweep.trial_job({key: value}))[0])
            if other != shapes:
                raise UserError(f"space.{key}: value {value!r} changes the model's weights, so a pbt trial could "
                                "not take over another's; sweep it with asha, hyperband or fifo, or keep pbt's "
                                "space to training settings (optim.lr, optim.weight_decay, dropout, ...).")


def check_search(cfg: SweepConfig, space: dict[str, Domain]) -> None:
    if cfg.points and (cfg.search not in ("random", "grid") or cfg.scheduler.name == "pbt"):
        raise UserError(f"points: each point is one trial, which search {cfg.search!r} with scheduler "
                        f"{cfg.scheduler.name!r} would not keep; use search grid or random, and not pbt.")
    grid = [k for k, d in space.items() if d.kind == "grid" and k != POINT]
    if cfg.search == "grid":
        ranges = [k for k, d in space.items() if d.kind not in ("grid", "choice")]
        if ranges:
            raise UserError(f"space.{ranges[0]}: search 'grid' enumerates values; use grid or choice, "
                            "or search: random / optuna / hyperopt for ranges.")
    elif grid and cfg.search != "random":
        raise UserError(f"space.{grid[0]}: search {cfg.search!r} samples its own points; use choice "
                        "instead of grid (or search: grid / random).")


def check_metric(sweep: SweepConfig, names: set[str], final: set[str]) -> None:
    """The metric ranks and stops trials, so every iteration must report it; plots may use final ones."""
    if sweep.metric not in names:
        raise invalid_choice("metric", sweep.metric, names)
    for name in sweep.plot_metrics:
        if name not in final:
            raise invalid_choice("plot_metrics", name, final)
