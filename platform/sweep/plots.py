"""A sweep's plots on its parent run: the metric against each hyperparameter, and every trial's curve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raycraft.plots import plt
from raycraft.sweep.config import POINT, Sweep


def _early(run: Any) -> bool:
    return run.data.tags.get("raycraft.early_stopped") == "true"


def _series(sweep: Sweep, runs: list[Any], key: str) -> dict[str, list[Any]]:
    """Runs split by the values of the sweep's other categorical keys (a lottery ticket's rewound and
    re-initialised trials), so each combination is its own line; one series when that would be 1 or > 8."""
    others = [k for k in sweep.space if k != key and sweep.space[k].kind in ("choice", "grid")]
    series: dict[str, list[Any]] = {}
    for run in runs:
        label = ", ".join(f"{k}={run.data.params.get(sweep.key(k))}" for k in others)
        series.setdefault(label, []).append(run)
    return series if 1 < len(series) <= 8 else {"": runs}


def metric_vs_params_png(sweep: Sweep, runs: list[Any], path: Path) -> None:
    """A row per metric (the sweep's, then plot_metrics), a column per hyperparameter: each trial's last
    value, a line per combination of the other categorical hyperparameters; early-stopped trials hollow.
    Choices keep the sweep file's order (widths of double descent, sparsities of a lottery ticket). The index of
    a sweep's points is no hyperparameter: a sweep of points alone has no such plot."""
    metrics = [sweep.config.metric, *sweep.config.plot_metrics]
    keys = [k for k in sweep.space if k != POINT]
    if not keys:
        return
    fig, axes = plt.subplots(len(metrics), len(keys), figsize=(4.5 * len(keys), 3.2 * len(metrics)), squeeze=False)
    for col, key in enumerate(keys):
        domain = sweep.space[key]
        categorical = domain.kind in ("choice", "grid")
        labels = [str(list(v)) if isinstance(v, (list, tuple)) else str(v) for v in domain.values]
        for row, metric in enumerate(metrics):
            ax = axes[row][col]
            for i, (name, group) in enumerate(_series(sweep, runs, key).items()):
                points = []
                for run in group:
                    value = run.data.params.get(sweep.key(key))
                    if metric not in run.data.metrics or value is None or (categorical and value not in labels):
                        continue
                    x = labels.index(value) if categorical else float(value)
                    points.append((x, run.data.metrics[metric]))
                    ax.scatter(*points[-1], facecolors="none" if _early(run) else f"C{i}", edgecolors=f"C{i}")
                if name and points:
                    points.sort()
                    ax.plot(*zip(*points, strict=True), color=f"C{i}", alpha=0.6, label=name)
            if categorical:
                ax.set_xticks(range(len(labels)), labels, rotation=30 if max(map(len, labels)) > 6 else 0)
            elif domain.kind == "loguniform":
                ax.set_xscale("log")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6)
            ax.set_xlabel(key)
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
    axes[0][0].set_title("filled: finished, hollow: stopped early", fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def curves_png(metric: str, runs: list[Any], histories: dict[str, list[Any]], path: Path,
               x: tuple[str, int] = ("epoch", 1)) -> None:
    """Every trial's metric against its progress (x: label, offset added to each metric's step) on one
    axis; dashed lines were stopped early."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        points = sorted((int(m.step), m.value) for m in histories.get(run.info.run_id, []))
        if points:
            ax.plot([p[0] + x[1] for p in points], [p[1] for p in points], marker="o", ms=3,
                    linestyle="--" if _early(run) else "-", label=run.data.tags.get("raycraft.trial_id", ""))
    ax.set_xlabel(x[0])
    ax.set_ylabel(metric)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
