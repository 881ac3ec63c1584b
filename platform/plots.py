"""PNG plots logged to MLflow: learning curves, confusion matrices, lines against a variable."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def curves_png(history: Sequence[dict[str, float]], path: Path) -> None:
    """One panel per metric name (loss, accuracy, ...), train and val on the same axes, against epoch."""
    epochs = [h["epoch"] for h in history]
    names = sorted({k.split("_", 1)[1] for h in history for k in h if k.startswith(("train_", "val_"))})
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(4.5 * max(len(names), 1), 3.5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=False):  # one spare axis when there are no metrics
        for split in ("train", "val"):
            key = f"{split}_{name}"
            if any(key in h for h in history):
                ax.plot(epochs, [h.get(key, np.nan) for h in history], marker="o", ms=3, label=split)
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def confusion_matrix_png(y_true, y_pred, class_names: Sequence[str] | None, path: Path) -> None:
    """Counts of (true, predicted) class pairs on the test set, rows = true class."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    k = int(max(y_true.max(), y_pred.max()) + 1) if class_names is None else len(class_names)
    cm = np.zeros((k, k), dtype=int)
    np.add.at(cm, (y_true, y_pred), 1)
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    fig, ax = plt.subplots(figsize=(0.5 * k + 2.5, 0.5 * k + 2))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), names, rotation=45 if max(map(len, names)) > 2 else 0)
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            if cm[i, j]:
                ax.text(j, i, cm[i, j], ha="center", va="center", fontsize=7,
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_title(f"test accuracy {np.trace(cm) / max(cm.sum(), 1):.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def lines_png(x, series: dict, path: Path, xlabel: str, ylabel: str, title: str, logy: bool = False) -> None:
    """One line per `name: values` against x."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, values in series.items():
        ax.plot(x, values, marker="o", ms=3, label=name)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    save(fig, ax, title, path)


def save(fig, ax, title: str, path: Path) -> None:
    """Title, legend and grid on `ax`; `fig` written to `path` and closed."""
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
