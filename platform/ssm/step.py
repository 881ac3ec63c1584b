"""The training step of the time-series task: maximise the likelihood (or the ELBO) of the series.

A time-series model maps y (N, T, p), NaN where missing, to per-step log-likelihood terms ℓ_t (N, T)
and a (N, T) mask of the terms that count:

    Kalman filter        ℓ_t = log p(y_t | y_{1:t-1})                       (prediction-error decomposition)
    deep Kalman filter   ℓ_t = E_q[log p(y_t | z_t)] - KL(q(z_t | ·) || p(z_t | z_{t-1}))   (the ELBO's terms)

The step owns the objective: loss = -(1/n) Σ ℓ_t over the n scored steps, those that count and that the
split's own mask scores. The validation split filters the whole history and scores only its held-out
stretch, so its loss is the one-step-ahead predictive likelihood.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raycraft.ssm.plots import write_plots
from raycraft.train.step import Step, Sums, Update


def negative_log_likelihood(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(-Σ ℓ_t over the scored steps, their number n) for one batch (y, mask)."""
    y, mask = batch[0], batch[1]
    log_lik, counted = model(y)
    keep = counted & mask
    return torch.where(keep, -log_lik, torch.zeros_like(log_lik)).sum(), keep.sum()


class TimeSeriesStep(Step):
    """loss = mean negative log-likelihood (or negative ELBO) per scored observation."""

    def train_batch(self, model: nn.Module, batch: Any, update: Update) -> Sums:
        total, n = negative_log_likelihood(model, batch)
        update("main", total / n.clamp(min=1))
        params = getattr(model, "module", model).param_metrics()
        return {"loss": total.detach(), "n": n, **{k: v * n for k, v in params.items()}}

    @torch.no_grad()
    def eval_batch(self, model: nn.Module, batch: Any) -> Sums:
        total, n = negative_log_likelihood(model, batch)
        return {"loss": total, "n": n}

    def example_input(self, batch: Any) -> None:
        return None  # a filter unrolled over T steps is no exportable graph; the checkpoint is logged

    @torch.no_grad()
    def artifacts(self, model: nn.Module, test_batches: Iterable[Any], info: dict[str, Any],
                  out_dir: Path) -> None:
        for batch in test_batches:  # the test split holds the whole history
            write_plots(model, batch[0], info, out_dir)
            return


STEP = TimeSeriesStep
