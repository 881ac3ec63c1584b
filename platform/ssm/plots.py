"""PNG plots of the state-space family: estimates with bands against data.

`write_plots` draws a time-series model's end-of-run figures from the estimates the model computes
(`KalmanModel.estimates`, `DeepKalmanFilter.latent_bands` and `reconstruction`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from raycraft.models.deep_kalman import DeepKalmanFilter  # noqa: E402
from raycraft.models.kalman import KalmanModel  # noqa: E402
from raycraft.plots import save  # noqa: E402


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
    save(fig, ax, title, path)


def kalman_plots(model: KalmanModel, y: torch.Tensor, name: str, out_dir: Path) -> None:
    """states.png: filtered and smoothed C x̂ with 95% bands against the data; forecast.png: one-step
    forecasts with their bands, then forecasts a fifth of the series' length beyond the last observation."""
    h = max(1, y.shape[1] // 5)
    est = model.estimates(y, h)
    bands_png(y[0, :, 0], {"filtered": est["filtered"], "smoothed": est["smoothed"]}, out_dir / "states.png", name)
    bands_png(y[0, :, 0], {"one-step forecast": est["one_step"], f"{h}-step forecast": est["ahead"]},
              out_dir / "forecast.png", name)


def deep_kalman_plots(model: DeepKalmanFilter, y: torch.Tensor, name: str, out_dir: Path) -> None:
    """latent.png: posterior means of z with bands; reconstruction.png: F(E[z]) against the data."""
    bands_png(torch.full((y.shape[1],), float("nan")), model.latent_bands(y), out_dir / "latent.png",
              f"{name}: posterior latent state")
    bands_png(y[0, :, 0], {"F(E[z])": model.reconstruction(y)}, out_dir / "reconstruction.png", name)


PLOTS: dict[type, Callable[..., None]] = {KalmanModel: kalman_plots, DeepKalmanFilter: deep_kalman_plots}
"""Each time-series model's end-of-run plots."""


def write_plots(model: nn.Module, y: torch.Tensor, info: dict, out_dir: Path) -> None:
    """The end-of-run plots of `model` for the series y (N, T, p) (the first one is drawn)."""
    PLOTS[type(model)](model, y, info.get("name", "series"), out_dir)
