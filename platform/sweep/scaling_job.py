"""`raycraft scaling FILE.yaml`: train a grid of model sizes x data amounts, fit scaling laws, log them.

    name: scaling_transformer
    job: {model: transformer, dataset: shakespeare, ...}   # a `raycraft train` config
    sizes: [{d_model: 32, n_layers: 1}, ...]               # job overrides that set N
    data: [{epochs: 1}, {epochs: 2}, ...]                  # job overrides that set D
    metric: val_loss
    holdout: 1          # the largest sizes, predicted by the fit of the others
    budget: 1.0e+15     # FLOPs for the compute-optimal N and D

N counts the model's parameters outside embedding tables (`nn.Embedding`), D the training targets seen
(tokens for a language model: epochs x training windows x tokens per window), C = 6 N D. Every run is an
MLflow child of one parent run, which gets the fitted constants with their standard errors, the held-out
errors, the compute-optimal allocation and log-log plots with the fits.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from raycraft import lifecycle, tracking
from raycraft.config import build, from_dict, load_yaml, to_dict
from raycraft.errors import UserError, invalid_choice
from raycraft.plots import plt
from raycraft.registry import create_model, field_doc, load_dataset
from raycraft.runner import run_training
from raycraft.sweep.probe import reported_metrics
from raycraft.sweep.scaling import Fit, compute_optimal, fit_chinchilla, fit_power_law, held_out_error
from raycraft.train.config import TrainConfig


@dataclass
class ScalingConfig:
    name: str = field_doc("", "Name of the MLflow parent run (default: the file's stem).")
    job: dict[str, Any] = field_doc(doc="The base `raycraft train` config.", factory=dict)
    sizes: list[dict[str, Any]] = field_doc(doc="Job overrides, one per model size N.", factory=list)
    data: list[dict[str, Any]] = field_doc(doc="Job overrides, one per data amount D (data.train_fraction, "
                                               "epochs); at least 3 for L(D).", factory=list)
    metric: str = field_doc("val_loss", "Loss to fit (a per-epoch metric; its last value is used).")
    holdout: int = field_doc(1, "Largest sizes left out of the fits and predicted by them.")
    irreducible: bool = field_doc(True, "Fit L(N) and L(D) with an irreducible term E.")
    budget: float = field_doc(1e15, "Compute budget C in FLOPs for the compute-optimal N and D.")
    experiment: str = field_doc("raycraft-scaling", "MLflow experiment.")

    def __post_init__(self) -> None:
        fit_sizes = len(self.sizes) - self.holdout
        if self.holdout < 1 or fit_sizes < 4:
            raise UserError(f"sizes: {len(self.sizes)} sizes with holdout={self.holdout} leave {fit_sizes} to "
                            "fit; the laws need at least 4 (and holdout >= 1 to test the prediction).")
        if len(self.data) < 3:
            raise UserError(f"data: {len(self.data)} data amounts; L(D) needs at least 3.")
        if fit_sizes * len(self.data) < 6:
            raise UserError("data: L(N, D) has 5 constants; fitted sizes x data amounts must be at least 6.")
        if self.budget <= 0:
            raise UserError(f"budget: {self.budget} must be > 0 FLOPs.")


@dataclass
class Point:
    """One run of the grid: its config and, once trained, its size N, data D and loss."""

    size: int
    cfg: TrainConfig
    n: float
    d: float
    loss: float = float("nan")
    run_id: str = ""


def measure(cfg: TrainConfig) -> tuple[float, float]:
    """(N, D): parameters outside embedding tables, and training targets seen over all epochs."""
    splits = load_dataset(cfg.dataset, cfg.data)
    model = create_model(cfg.model, cfg.model_config, splits.info)
    embedded = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    n = sum(p.numel() for p in model.parameters() if id(p) not in embedded)
    per_example = splits.train[torch.arange(1)][-1][0].numel()
    return float(n), float(cfg.epochs * len(splits.train) * per_example)


def load_scaling(path: str | Path) -> tuple[ScalingConfig, list[Point]]:
    """Validate the file and build every run's config before Ray starts."""
    raw = load_yaml(path)
    raw.setdefault("name", Path(path).stem)
    cfg = from_dict(ScalingConfig, raw)
    points = []
    for i, size in enumerate(cfg.sizes):
        for data in cfg.data:
            try:  # the job's keys, then each point's, as `raycraft train` layers a --config file and --set
                train_cfg, _ = build(TrainConfig, [cfg.job, {"experiment": cfg.experiment}, size, data])
            except UserError as exc:
                raise UserError(f"sizes[{i}] with data {data}: {exc}") from None
            points.append(Point(i, train_cfg, *measure(train_cfg)))
    names = reported_metrics(points[0].cfg)[1]  # a fit reads each run's end-of-run value
    if cfg.metric not in names:
        raise invalid_choice("metric", cfg.metric, names)
    return cfg, points


@dataclass
class Analysis:
    fits: dict[str, Fit]
    held_out: dict[str, float]
    optimal: tuple[float, float]


def analyse(cfg: ScalingConfig, points: list[Point]) -> Analysis:
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
    parent.log_metrics(values)
    table = [{"size": p.size, "N": p.n, "D": p.d, "C": 6 * p.n * p.d, cfg.metric: float(p.loss), "run_id": p.run_id}
             for p in points]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "runs.yaml").write_text(yaml.safe_dump(table, sort_keys=False))
        loglog_png(cfg, points, result, Path(tmp) / "scaling_loglog.png")
        parent.log_artifacts(tmp, "scaling")


def run_scaling(cfg: ScalingConfig, points: list[Point], *, tracking_uri: str | None = None,
                address: str | None = None, echo=None) -> tuple[str, Analysis]:
    uri = tracking.resolve_tracking_uri(tracking_uri)
    parent = tracking.Run.start(uri, cfg.experiment, f"scaling-{cfg.name}",
                                {"metric": cfg.metric, "holdout": cfg.holdout, "budget": cfg.budget,
                                 "runs": len(points)}, {"raycraft.kind": "scaling"},
                                yaml.safe_dump(to_dict(cfg), sort_keys=False))
    try:
        with parent.heartbeat(), lifecycle.stop_on_signals():
            result = run_points(cfg, points, uri, parent.run_id, address, echo)
        log_analysis(parent, cfg, points, result)
    except BaseException as exc:
        parent.end_with(exc)
        raise
    parent.end()
    return parent.run_id, result


def run_points(cfg: ScalingConfig, points: list[Point], uri: str, parent: str, address: str | None,
               echo) -> Analysis:
    """Train each point as a child of the scaling run, then fit the law."""
    for i, p in enumerate(points):
        out = run_training(p.cfg, address=address, tracking_uri=uri, run_name=f"{cfg.name}-N{p.n:.3g}-D{p.d:.3g}",
                           tags={"mlflow.parentRunId": parent, "raycraft.scaling.N": str(p.n),
                                 "raycraft.scaling.D": str(p.d)})
        p.loss, p.run_id = out.metrics[cfg.metric], out.run_id
        if echo:
            echo(f"run {i + 1}/{len(points)}: N={p.n:.3g} D={p.d:.3g} {cfg.metric}={p.loss:.4f}")
    return analyse(cfg, points)
