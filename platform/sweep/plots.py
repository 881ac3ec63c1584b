"""A sweep's plots on its parent run: the metric against each hyperparameter, and every trial's curve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raycraft.plots import plt
from raycraft.sweep.config import Sweep, job_key


def _early(run: Any) -> bool:
    return run.data.tags.get("raycraft.early_stopped") == "true"


def metric_vs_params_png(sweep: Sweep, runs: list[Any], path: Path) -> None:
    """One panel per hyperparameter: each trial's last metric value; early-stopped trials hollow."""
    metric = sweep.config.metric
    keys = list(sweep.space)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        domain = sweep.space[key]
        raw = [r.data.params.get(job_key(key)) for r in runs]
        categorical = domain.kind in ("choice", "grid") and not all(_is_number(v) for v in raw)
        labels = sorted({str(v) for v in raw}) if categorical else []
        for run, value in zip(runs, raw, strict=True):
            if metric not in run.data.metrics or value is None:
                continue
            x = labels.index(str(value)) if categorical else float(value)
            ax.scatter([x], [run.data.metrics[metric]], facecolors="none" if _early(run) else "C0",
                       edgecolors="C0")
        if categorical:
            ax.set_xticks(range(len(labels)), labels)
        elif domain.kind == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].set_title("filled: finished, hollow: stopped early", fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _is_number(v: Any) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True


def curves_png(metric: str, runs: list[Any], histories: dict[str, list[Any]], path: Path) -> None:
    """Every trial's metric against epoch on one axis; dashed lines were stopped early."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        points = sorted((int(m.step), m.value) for m in histories.get(run.info.run_id, []))
        if points:
            ax.plot([p[0] + 1 for p in points], [p[1] for p in points], marker="o", ms=3,
                    linestyle="--" if _early(run) else "-", label=run.data.tags.get("raycraft.trial_id", ""))
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    if runs:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
