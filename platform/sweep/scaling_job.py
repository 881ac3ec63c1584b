"""`raycraft scaling FILE.yaml`: train model sizes x data amounts as Ray Tune trials, fit scaling laws, log them.

    name: scaling_transformer
    job: {model: transformer, dataset: shakespeare, ...}   # a `raycraft train` config
    sizes: [{d_model: 32, n_layers: 1}, ...]               # job overrides that set N
    data: [{epochs: 1}, {epochs: 2}, ...]                  # job overrides that set D
    metric: val_loss
    holdout: 1          # the largest sizes, predicted by the fit of the others
    budget: 1.0e+15     # FLOPs for the compute-optimal N and D
    concurrency: 8      # trials at once, as the cluster's CPUs allow

or, for IsoFLOP profiles (Hoffmann et al. 2022, approach 2; `sweep.isoflop`), budgets instead of `data`:

    budgets: [2.0e+9, 6.0e+9, 2.0e+10, 6.0e+10]   # FLOPs; at least 4, the largest predicted by the others
    sizes_per_budget: 5                          # sizes around N = sqrt(C / (6 tokens_per_param)) per budget

Each point is one trial of the sweep engine `raycraft tune` uses (`sweep.engine`, with the sweep's
`points`): one MLflow parent, a child per point, as many at once as resources and `concurrency` allow.
`--resume NAME` continues a killed search: finished points are kept, unfinished ones rerun.

N counts the model's parameters outside embedding tables (`nn.Embedding`), D the training targets seen
(tokens for a language model: epochs x training windows x tokens per window), C = 6 N D; each child run
also logs the FLOPs torch counts (`torch.utils.flop_counter`, forward and backward of one example, times
the examples seen), and the parent the mean ratio of counted to 6ND. The parent gets the fitted constants
with their standard errors, the held-out errors, the compute-optimal allocation and log-log plots.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from raycraft import tracking
from raycraft.config import build, from_dict, load_yaml, merge_layers, read_yaml, to_dict
from raycraft.data.base import DataSplits
from raycraft.errors import TrainingError, UserError, invalid_choice
from raycraft.plots import plt
from raycraft.registry import create_model, field_doc, load_dataset
from raycraft.sweep.config import POINT, Sweep, load_sweep
from raycraft.sweep.engine import STATE_FILE, run_sweep, sweep_dir
from raycraft.sweep.isoflop import analyse_isoflop, data_for, isoflop_png, pick_sizes
from raycraft.sweep.probe import reported_metrics
from raycraft.sweep.scaling import Fit, IsoFLOP, compute_optimal, fit_chinchilla, fit_power_law, held_out_error
from raycraft.train.config import TrainConfig


@dataclass
class ScalingConfig:
    name: str = field_doc("", "Name of the MLflow parent run and of the Tune experiment `--resume NAME` "
                              "continues (default: the file's stem).")
    job: dict[str, Any] = field_doc(doc="The base `raycraft train` config.", factory=dict)
    sizes: list[dict[str, Any]] = field_doc(doc="Job overrides, one per model size N.", factory=list)
    data: list[dict[str, Any]] = field_doc(doc="Job overrides, one per data amount D (data.train_fraction, "
                                               "epochs); at least 3 for L(D). Empty with `budgets`.", factory=list)
    budgets: list[float] = field_doc(doc="IsoFLOP profiles instead of a grid: compute budgets C in FLOPs, at "
                                         "least 4, increasing; each trains `sizes_per_budget` of `sizes` on "
                                         "D = C / 6N.", factory=list)
    sizes_per_budget: int = field_doc(5, "IsoFLOP: sizes trained per budget (at least 3 for its parabola).")
    tokens_per_param: float = field_doc(20.0, "IsoFLOP: the D/N ratio the sizes of each budget centre on "
                                              "(Hoffmann et al. find about 20).")
    metric: str = field_doc("val_loss", "Loss to fit (a per-epoch metric; its last value is used).")
    holdout: int = field_doc(1, "Grid: largest sizes left out of the fits and predicted by them (IsoFLOP: "
                                "the largest budget is).")
    irreducible: bool = field_doc(True, "Fit L(N) and L(D) with an irreducible term E.")
    budget: float = field_doc(1e15, "Compute budget C in FLOPs for the compute-optimal N and D.")
    concurrency: int = field_doc(8, "Trials at once (each needs the job's workers x cpus_per_worker CPUs).")
    experiment: str = field_doc("raycraft-scaling", "MLflow experiment.")
    storage_path: str = field_doc("ray_results", "Folder of Tune's experiment state (one subfolder per search).")

    def __post_init__(self) -> None:
        if self.budget <= 0:
            raise UserError(f"budget: {self.budget} must be > 0 FLOPs.")
        if self.concurrency < 1:
            raise UserError(f"concurrency: {self.concurrency} must be at least 1.")
        (check_isoflop if self.budgets else check_grid)(self)


def check_grid(cfg: ScalingConfig) -> None:
    fit_sizes = len(cfg.sizes) - cfg.holdout
    if cfg.holdout < 1 or fit_sizes < 4:
        raise UserError(f"sizes: {len(cfg.sizes)} sizes with holdout={cfg.holdout} leave {fit_sizes} to "
                        "fit; the laws need at least 4 (and holdout >= 1 to test the prediction).")
    if len(cfg.data) < 3:
        raise UserError(f"data: {len(cfg.data)} data amounts; L(D) needs at least 3.")
    if fit_sizes * len(cfg.data) < 6:
        raise UserError("data: L(N, D) has 5 constants; fitted sizes x data amounts must be at least 6.")


def check_isoflop(cfg: ScalingConfig) -> None:
    if cfg.data:
        raise UserError("data: with budgets, each run's D is C / 6N; drop `data` (or drop `budgets` for a grid).")
    if len(cfg.budgets) < 4 or any(b <= 0 for b in cfg.budgets) or sorted(set(cfg.budgets)) != cfg.budgets:
        raise UserError(f"budgets: {cfg.budgets} must be at least 4 increasing FLOP counts > 0: N_opt and "
                        "D_opt are fitted on all but the largest, which they predict.")
    if not 3 <= cfg.sizes_per_budget <= len(cfg.sizes):
        raise UserError(f"sizes_per_budget: {cfg.sizes_per_budget} must be at least 3 (a parabola) and at most "
                        f"the {len(cfg.sizes)} sizes given.")
    if cfg.tokens_per_param <= 0:
        raise UserError(f"tokens_per_param: {cfg.tokens_per_param} must be > 0.")


@dataclass
class Point:
    """One run: its job overrides and config, its size N, data D and (at a budget) C; once trained, its loss."""

    size: int
    overrides: dict[str, Any]
    cfg: TrainConfig
    n: float
    d: float
    flops: float
    budget: float = float("nan")
    loss: float = float("nan")
    run_id: str = ""


def non_embedding_parameters(model: nn.Module) -> int:
    embedded = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in embedded)


def counted_flops(model: nn.Module, x: torch.Tensor) -> float:
    """FLOPs of one forward and backward pass of `x` (one example) as torch counts them; NaN for a model whose
    output is no tensor."""
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        if not isinstance(out, torch.Tensor):
            return float("nan")
        out.float().sum().backward()
    return float(counter.get_total_flops())


def measure(cfg: TrainConfig, loaded: dict[str, DataSplits]) -> tuple[float, float, float]:
    """(N, D, FLOPs): parameters outside embedding tables, training targets seen over all epochs, and the FLOPs
    torch counts for them. `loaded` keeps each dataset read at its full training split, for the next point."""
    full = dataclasses.replace(cfg.data, train_fraction=1.0)
    key = f"{cfg.dataset} {full}"
    if key not in loaded:
        loaded[key] = load_dataset(cfg.dataset, full)
    splits = copy.copy(loaded[key])
    splits.keep_train_fraction(cfg.data.train_fraction)
    model = create_model(cfg.model, cfg.model_config, splits.info)
    first = splits.train[torch.arange(1)]
    x, y = first[0], first[-1]
    examples = cfg.epochs * len(splits.train)
    return (float(non_embedding_parameters(model)), float(examples * y[0].numel()),
            counted_flops(model, x) * examples)


def make_point(cfg: ScalingConfig, size: int, layers: list[dict[str, Any]], where: str,
               loaded: dict[str, DataSplits]) -> Point:
    overrides = merge_layers(TrainConfig, layers)  # one nested mapping: a size's and a data amount's keys merge
    try:  # the job's keys, then the point's, as `raycraft train` layers a --config file and --set
        train_cfg, _ = build(TrainConfig, [cfg.job, {"experiment": cfg.experiment}, *layers])
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    return Point(size, overrides, train_cfg, *measure(train_cfg, loaded))


def isoflop_points(cfg: ScalingConfig, loaded: dict[str, DataSplits]) -> list[Point]:
    """Each budget's sizes (`isoflop.pick_sizes`), each on D = C / 6N from one epoch's D at the full split."""
    full = [make_point(cfg, i, [size, {"epochs": 1, "data.train_fraction": 1.0}], f"sizes[{i}]", loaded)
            for i, size in enumerate(cfg.sizes)]
    points = []
    for c in cfg.budgets:
        for i in pick_sizes(c, [p.n for p in full], cfg.sizes_per_budget, cfg.tokens_per_param):
            point = make_point(cfg, i, [cfg.sizes[i], data_for(c, full[i].n, full[i].d)],
                               f"budgets: C={c:.3g} with sizes[{i}]", loaded)
            point.budget = c
            points.append(point)
    return points


def load_scaling(path: str | Path, name: str | None = None) -> tuple[ScalingConfig, list[Point]]:
    """Validate the file (its name replaced by `name`) and build every run's config before Ray starts."""
    raw = load_yaml(path)
    raw.setdefault("name", Path(path).stem)
    if name:
        raw["name"] = name
    cfg = from_dict(ScalingConfig, raw)
    loaded: dict[str, DataSplits] = {}
    if cfg.budgets:
        points = isoflop_points(cfg, loaded)
    else:
        points = [make_point(cfg, i, [size, data], f"sizes[{i}] with data {data}", loaded)
                  for i, size in enumerate(cfg.sizes) for data in cfg.data]
    names = reported_metrics(points[0].cfg)[1]  # a fit reads each run's end-of-run value
    if cfg.metric not in names:
        raise invalid_choice("metric", cfg.metric, names)
    return cfg, points


def as_sweep(cfg: ScalingConfig, points: list[Point]) -> Sweep:
    """The search as a sweep of the engine: a grid over its points, one trial each, ranked by the metric."""
    return load_sweep(data={"name": cfg.name, "job": cfg.job, "points": [p.overrides for p in points],
                            "search": "grid", "metric": cfg.metric, "mode": "min", "samples": 1,
                            "concurrency": cfg.concurrency, "experiment": cfg.experiment,
                            "storage_path": cfg.storage_path})


@dataclass
class Analysis:
    fits: dict[str, Fit]
    held_out: dict[str, float]
    optimal: tuple[float, float]
    profiles: list[IsoFLOP] = field(default_factory=list)


def analyse(cfg: ScalingConfig, points: list[Point]) -> Analysis:
    """IsoFLOP profiles (`budgets`), or the grid's laws."""
    if not cfg.budgets:
        return analyse_grid(cfg, points)
    fits, held, profiles = analyse_isoflop(points)
    n_opt = float(fits["a"].predict(cfg.budget))
    return Analysis(fits, held, (n_opt, cfg.budget / 6 / n_opt), profiles)


def analyse_grid(cfg: ScalingConfig, points: list[Point]) -> Analysis:
    """Fit on the smaller sizes; predict the held-out largest ones."""
    cut = len(cfg.sizes) - cfg.holdout
    fit_pts = [p for p in points if p.size < cut]
    test_pts = [p for p in points if p.size >= cut]
    max_d = max(p.d for p in fit_pts)
    at_max_d = [p for p in fit_pts if p.d == max_d]  # L(N): every size with the most data
    largest = max(p.size for p in fit_pts)
    at_max_n = [p for p in fit_pts if p.size == largest]  # L(D): the largest fitted size, every D

    def arr(pts: list[Point], attr: str) -> np.ndarray:
        return np.array([getattr(p, attr) for p in pts])

    def one_law(pts: list[Point], attr: str) -> Fit:  # E needs a 4th point; with 3, the pure power law
        return fit_power_law(arr(pts, attr), arr(pts, "loss"), cfg.irreducible and len(pts) >= 4)

    fits = {"L_N": one_law(at_max_d, "n"), "L_D": one_law(at_max_n, "d"),
            "L_ND": fit_chinchilla(arr(fit_pts, "n"), arr(fit_pts, "d"), arr(fit_pts, "loss"))}
    held = {"L_ND": float(held_out_error(fits["L_ND"], arr(test_pts, "loss"), arr(test_pts, "n"),
                                         arr(test_pts, "d")).mean())}
    test_max_d = [p for p in test_pts if p.d == max(q.d for q in test_pts)]
    held["L_N"] = float(held_out_error(fits["L_N"], arr(test_max_d, "loss"), arr(test_max_d, "n")).mean())
    return Analysis(fits, held, compute_optimal(fits["L_ND"], cfg.budget))


def loglog_png(cfg: ScalingConfig, points: list[Point], result: Analysis, path: Path) -> None:
    cut = len(cfg.sizes) - cfg.holdout
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, attr, law in ((axes[0], "n", "L_N"), (axes[1], "d", "L_D")):
        other = "d" if attr == "n" else "n"
        for value in sorted({getattr(p, other) for p in points}):
            pts = sorted((p for p in points if getattr(p, other) == value), key=lambda p: getattr(p, attr))
            xs = [getattr(p, attr) for p in pts]
            line = ax.plot(xs, [p.loss for p in pts], marker="o", ms=4, lw=0.8, label=f"{other.upper()}={value:.3g}")
            held = [p for p in pts if p.size >= cut]
            ax.scatter([getattr(p, attr) for p in held], [p.loss for p in held], s=80, facecolors="none",
                       edgecolors=line[0].get_color())
            grid = np.geomspace(min(xs), max(xs), 50)
            ax.plot(grid, result.fits["L_ND"].predict(*((grid, np.full_like(grid, value)) if attr == "n"
                                                         else (np.full_like(grid, value), grid))),
                    ls=":", color=line[0].get_color())
        xs = np.geomspace(min(getattr(p, attr) for p in points), max(getattr(p, attr) for p in points), 50)
        params = result.fits[law].params
        ax.plot(xs, result.fits[law].predict(xs), "k--",
                label=f"{law}: alpha={params['alpha']:.3f}" + (f", E={params['E']:.3f}" if "E" in params else ""))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N (non-embedding parameters)" if attr == "n" else "D (training targets seen)")
        ax.set_ylabel(cfg.metric)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6)
    axes[0].set_title("dotted: L(N, D) fit; circled: held out", fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def log_analysis(parent: tracking.Run, cfg: ScalingConfig, points: list[Point], result: Analysis) -> None:
    values = {f"{law}.{k}": v for law, fit in result.fits.items() for k, v in fit.params.items()}
    values |= {f"{law}.{k}_stderr": v for law, fit in result.fits.items() for k, v in fit.stderr.items()}
    values |= {f"{law}.rmse_log": fit.rmse_log for law, fit in result.fits.items()}
    values |= {f"heldout_rel_error.{law}": v for law, v in result.held_out.items()}
    values |= {"optimal_N": result.optimal[0], "optimal_D": result.optimal[1]}
    values |= {f"isoflop.{i}.{k}": getattr(p, k) for i, p in enumerate(result.profiles)
               for k in ("compute", "n_opt", "d_opt", "loss_opt")}
    parent.log_metrics(values)
    with tempfile.TemporaryDirectory() as tmp:
        if result.profiles:
            isoflop_png(cfg.metric, points, result.fits, result.profiles, Path(tmp) / "isoflop.png")
        else:
            loglog_png(cfg, points, result, Path(tmp) / "scaling_loglog.png")
        parent.log_artifacts(tmp, "scaling")


def record_points(parent: tracking.Run, cfg: ScalingConfig, points: list[Point], runs: list) -> None:
    """Each point's loss and run from its finished child run (the newest, if a resume reran it), its N, D, C
    and counted FLOPs logged on that run, and the table of all on the parent; a TrainingError names the points
    that did not finish."""
    finished = {int(r.data.tags[f"raycraft.param.{POINT}"]): r for r in runs if r.info.status == "FINISHED"}
    missing = [i for i in range(len(points)) if i not in finished]
    if missing:
        raise TrainingError(f"points {missing} of {len(points)} did not finish (see their child runs); rerun them "
                            f"with `raycraft scaling FILE --resume {cfg.name}`.")
    for i, p in enumerate(points):
        p.loss, p.run_id = finished[i].data.metrics[cfg.metric], finished[i].info.run_id
        tracking.Run(parent.uri, p.run_id).log_metrics({"scaling.N": p.n, "scaling.D": p.d, "scaling.C": 6 * p.n * p.d,
                                                        "scaling.flops_counted": p.flops})
    ratios = [p.flops / (6 * p.n * p.d) for p in points if np.isfinite(p.flops)]
    if ratios:
        parent.log_metrics({"flops_counted_over_6ND": float(np.mean(ratios))})
    table = [{"point": i, "size": p.size, "budget": p.budget, "N": p.n, "D": p.d, "C": 6 * p.n * p.d,
              "flops_counted": p.flops, cfg.metric: float(p.loss), "run_id": p.run_id} for i, p in enumerate(points)]
    parent.log_text(yaml.safe_dump(table, sort_keys=False), "scaling/runs.yaml")
    parent.log_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), "scaling/scaling.yaml")


def check_unchanged(sweep: Sweep) -> None:
    """`--resume`: the search saved under the name must be the one the file describes now."""
    cfg = sweep.config
    state_file = sweep_dir(cfg.storage_path, cfg.name) / STATE_FILE
    if not state_file.is_file():
        raise UserError(f"--resume: no scaling search {cfg.name!r} in {state_file.parent.parent}; start it "
                        "without --resume.")
    saved = read_yaml(state_file.read_text(), str(state_file))["sweep"]
    for key, now in (("job", sweep.job), ("points", cfg.points), ("metric", cfg.metric)):
        if saved.get(key) != now:
            raise UserError(f"--resume: the file's {key} differ from those search {cfg.name!r} started with; "
                            "resume it with the file it started from, or start a new search (`name`).")


def run_scaling(cfg: ScalingConfig, points: list[Point], *, tracking_uri: str | None = None,
                address: str | None = None, resume: bool = False, echo=None) -> tuple[str, Analysis]:
    """Run (or with `resume`, continue) the search as Tune trials, then fit and log on the parent run."""
    sweep = as_sweep(cfg, points)
    if resume:
        check_unchanged(sweep)
    results: list[Analysis] = []

    def finish(parent: tracking.Run, runs: list) -> None:
        record_points(parent, cfg, points, runs)
        results.append(analyse(cfg, points))
        log_analysis(parent, cfg, points, results[0])

    outcome = run_sweep(sweep, tracking_uri=tracking_uri, address=address, resume=resume, echo=echo,
                        finish=finish, kind="scaling")
    return outcome.parent_run_id, results[0]
