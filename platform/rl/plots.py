"""The RL run's figure: episode return against env steps, for training and greedy evaluation episodes."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def returns_png(history: list[dict[str, float]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in (("return_mean", "training episodes"), ("eval_return_mean", "evaluation (greedy)")):
        pts = [(h["env_steps"], h[key]) for h in history if key in h]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", ms=2, label=label)
    ax.set_xlabel("env steps")
    ax.set_ylabel("episode return")
    ax.grid(alpha=0.3)
    if ax.lines:  # no finished episode yet in a very short run
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
