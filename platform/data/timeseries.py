"""Time-series datasets: series y (N, T, p) float64, NaN where missing, split in time.

train scores the first stretch, val the next, test the last; val and test filter the whole history
before them and score only their own steps (one-step-ahead prediction). Each split is a TensorDataset
of (y, mask), mask (N, T) marking the scored steps, so the loop batches over series.

`nile` and `co2` are the files inside statsmodels; `csv_series` reads your CSV; `nonlinear_latent`
is a simulated nonlinear system whose true state is known, for the deep Kalman filter.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from raycraft.data.base import DataConfig, DataSplits
from raycraft.data.vision import package_file
from raycraft.errors import UserError, invalid_choice
from raycraft.registry import register_dataset


def series_splits(y: np.ndarray, cfg: DataConfig, name: str, **info) -> DataSplits:
    """y: (T,) or (T, p) for one series, or (N, T, p) for many, NaN where missing."""
    y = np.asarray(y, dtype=np.float64)
    y = y.reshape(1, -1, 1) if y.ndim == 1 else y[None] if y.ndim == 2 else y
    T = y.shape[1]
    n_test = int(round(T * cfg.test_fraction))
    n_val = int(round((T - n_test) * cfg.val_fraction))
    n_train = T - n_test - n_val
    if n_train < 2:
        raise UserError(f"data: a series of {T} steps leaves nothing to train on with val_fraction="
                        f"{cfg.val_fraction} and test_fraction={cfg.test_fraction}.")
    yt = torch.as_tensor(y)
    t = torch.arange(T)

    def split(start: int, stop: int) -> TensorDataset:
        mask = ((t >= start) & (t < stop)).expand(len(yt), T)[:, :stop]
        return TensorDataset(yt[:, :stop], mask.contiguous())

    flat = y.reshape(-1, y.shape[-1])
    diffs = np.diff(y[:, :n_train], axis=1)
    info = {"name": name, "obs_dim": y.shape[-1], "length": T, "num_series": len(y),
            "diff_var": float(np.nanvar(diffs)), "obs_mean": np.nanmean(flat[:n_train], 0).tolist(),
            "obs_std": np.nanstd(flat[:n_train], 0).tolist(), **info}
    return DataSplits(split(0, n_train), split(n_train, n_train + n_val), split(n_train + n_val, T), info)


def read_csv_column(path: str | Path, column: str | None = None) -> np.ndarray:
    """One numeric column of a CSV file with a header row (default: the last); empty cells and 'NA' are NaN."""
    path = Path(path)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 3:
        raise UserError(f"--data-dir: {path} needs a header row and at least two data rows.")
    header = [h.strip() for h in rows[0]]
    column = column or header[-1]
    if column not in header:
        raise invalid_choice(f"{path.name}: column", column, header)
    j = header.index(column)
    values = []
    for i, row in enumerate(rows[1:], start=2):
        cell = row[j].strip() if j < len(row) else ""
        try:
            values.append(float(cell) if cell and cell.upper() not in ("NA", "NAN") else np.nan)
        except ValueError:
            raise UserError(f"{path}: line {i}, column {column!r}: {cell!r} is not a number.") from None
    return np.array(values)


@register_dataset("nile", task="time-series", extra="ssm")
def nile(cfg: DataConfig) -> DataSplits:
    """Annual flow of the Nile at Aswan, 1871-1970 (100 values; statsmodels), the local-level classic."""
    return series_splits(read_csv_column(package_file("statsmodels", "datasets", "nile", "nile.csv"), "volume"),
                         cfg, "Nile flow (10^8 m^3)")


@register_dataset("co2", task="time-series", extra="ssm")
def co2(cfg: DataConfig) -> DataSplits:
    """Weekly atmospheric CO2 at Mauna Loa, 1958-2001 (2,284 weeks, 59 missing; statsmodels)."""
    return series_splits(read_csv_column(package_file("statsmodels", "datasets", "co2", "co2.csv"), "co2"),
                         cfg, "CO2 (ppm)")


@register_dataset("csv_series", task="time-series", needs_data_dir=True)
def csv_series(cfg: DataConfig) -> DataSplits:
    """Your series: the last column of the one *.csv file in --data-dir (header row; blank or NA = missing)."""
    files = sorted(Path(cfg.data_dir or "").glob("*.csv"))
    if len(files) != 1:
        raise UserError(f"--data-dir: {cfg.data_dir} must hold exactly one .csv file, found "
                        f"{len(files)}: {', '.join(f.name for f in files) or 'none'}.")
    return series_splits(read_csv_column(files[0]), cfg, files[0].stem)


def simulate_nonlinear(n: int = 200, T: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 1-D nonlinear latent state seen through two nonlinear channels:

        z_t = 0.9 z_{t-1} + 0.8 sin(z_{t-1}) + 0.3 ε_t,   z_0 ~ N(0, 1)
        y_t = [tanh(z_t), 0.5 z_t + 0.3 sin(2 z_t)] + 0.1 η_t
    Returns y (n, T, 2) and the true state z (n, T)."""
    rng = np.random.default_rng(seed)
    z = np.empty((n, T))
    z[:, 0] = rng.normal(size=n)
    for t in range(1, T):
        z[:, t] = 0.9 * z[:, t - 1] + 0.8 * np.sin(z[:, t - 1]) + 0.3 * rng.normal(size=n)
    y = np.stack([np.tanh(z), 0.5 * z + 0.3 * np.sin(2 * z)], -1) + 0.1 * rng.normal(size=(n, T, 2))
    return y, z


@register_dataset("nonlinear_latent", task="time-series")
def nonlinear_latent(cfg: DataConfig) -> DataSplits:
    """Simulated: 200 series of 60 steps, a 1-D nonlinear latent state seen through 2 nonlinear channels."""
    y, _ = simulate_nonlinear(seed=cfg.split_seed)
    return series_splits(y, cfg, "nonlinear latent system")
