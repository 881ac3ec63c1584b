"""The training step of the time-series task: maximise the likelihood (or the ELBO) of the series.

A time-series model maps y (N, T, p), NaN where missing, to per-step negative log-likelihood terms
(N, T) (the negative ELBO terms for a variational model) and a (N, T) mask of the terms that count.
A split's own mask says which steps it scores: the validation split filters the whole history and
scores only its held-out stretch, so its loss is the one-step-ahead predictive likelihood.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raycraft.train.step import Step, Sums, Update


def _scored(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    y, mask = batch[0], batch[1]
    nll, counted = model(y)
    keep = counted & mask
    return torch.where(keep, nll, torch.zeros_like(nll)).sum(), keep.sum()


class TimeSeriesStep(Step):
    """loss = mean negative log-likelihood (or negative ELBO) per scored observation."""

    def train_batch(self, model: nn.Module, batch: Any, update: Update) -> Sums:
        total, n = _scored(model, batch)
        update("main", total / n.clamp(min=1))
        params = getattr(model, "module", model).param_metrics()
        return {"loss": total.detach(), "n": n, **{k: v * n for k, v in params.items()}}

    @torch.no_grad()
    def eval_batch(self, model: nn.Module, batch: Any) -> Sums:
        total, n = _scored(model, batch)
        return {"loss": total, "n": n}

    def example_input(self, batch: Any) -> None:
        return None  # a filter unrolled over T steps is no exportable graph; the checkpoint is logged

    @torch.no_grad()
    def artifacts(self, model: nn.Module, test_batches: Iterable[Any], info: dict[str, Any],
                  out_dir: Path) -> None:
        for batch in test_batches:  # the test split holds the whole history
            model.write_plots(batch[0], info, out_dir)
            return


STEP = TimeSeriesStep
