"""PNG plots of the state-space and graph families: estimates with bands against data, curves against depth."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def bands_png(y, curves: dict, path: Path, title: str) -> None:
    """The data as dots, each curve `name: (t, mean, sd)` as a line with a mean ± 1.96 sd band."""
    fig, ax = plt.subplots(figsize=(9, 3.5))
    y = np.asarray(y, dtype=float)
    ax.plot(np.arange(len(y)), y, ".", ms=3, color="black", label="data")
    for name, (t, mean, sd) in curves.items():
        t, mean, sd = (np.asarray(v, dtype=float) for v in (t, mean, sd))
        ax.plot(t, mean, lw=1.2, label=name)
        ax.fill_between(t, mean - 1.96 * sd, mean + 1.96 * sd, alpha=0.2)
    ax.set_xlabel("t")
    _save(fig, ax, title, path)


def lines_png(x, series: dict, path: Path, xlabel: str, ylabel: str, title: str, logy: bool = False) -> None:
    """One line per `name: values` against x."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, values in series.items():
        ax.plot(x, values, marker="o", ms=3, label=name)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _save(fig, ax, title, path)


def _save(fig, ax, title: str, path: Path) -> None:
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
