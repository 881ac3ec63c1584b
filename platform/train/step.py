"""What a model family adds to the one training loop: a small `Step` object.

The loop owns everything shared (devices, data-parallel wrapping, sharding, optimizers, schedule,
mixed precision, clipping, checkpoints, metrics, MLflow). A step says only how a batch becomes losses
and metrics:

    train_batch(model, batch, update) -> sums      # calls update(name, loss) once per optimizer it steps
    eval_batch(model, batch)          -> sums

`sums` maps metric names to per-batch *sums* over examples plus 'n', the example count; the loop adds
them over batches and workers and divides by n. `finalize` turns the means into derived metrics
(accuracy from correct counts, perplexity from loss). A family with several optimizers (a GAN's
generator and discriminator) names them in `optimizers` and says which parameters each one owns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

Update = Callable[[str, torch.Tensor], None]
Sums = dict[str, torch.Tensor]


class Step:
    optimizers: tuple[str, ...] = ("main",)
    """Names of this family's optimizers; each gets the trainer's optim config unless overridden."""

    def optimizer_names(self, model: nn.Module) -> tuple[str, ...]:
        """The optimizers this model needs; `optimizers` unless a family's models differ (GAN vs VAE)."""
        return self.optimizers

    def parameters(self, model: nn.Module, optimizer: str) -> Iterable[nn.Parameter]:
        return model.parameters()

    def distribute(self, model: nn.Module, wrap: Callable[[nn.Module], nn.Module]) -> nn.Module:
        """The module `train_batch` receives with several workers. `wrap` makes a module data-parallel
        (DDP); a family that calls submodules directly (a GAN's generator, then its discriminator)
        wraps those instead, since DDP only syncs gradients of calls through its own forward."""
        return wrap(model)

    def start_epoch(self, model: nn.Module, epoch: int) -> None:
        """Called on every worker before an epoch's first batch (annealing schedules, curricula)."""

    def train_batch(self, model: nn.Module, batch: Any, update: Update) -> Sums:
        raise NotImplementedError

    def eval_batch(self, model: nn.Module, batch: Any) -> Sums:
        raise NotImplementedError

    def finalize(self, means: dict[str, float]) -> dict[str, float]:
        return means

    def example_input(self, batch: Any) -> torch.Tensor | None:
        """A model input taken from a batch, for the logged model's signature; None logs no model
        (for models that take several tensors or do not export), only the checkpoint."""
        return batch[0]

    def input_about(self, info: dict[str, Any]) -> str:
        """What the logged model's input holds, for its description: by default the data's examples, scaled
        as the dataset's reader scales them (its info's 'input_scale')."""
        return info.get("input_scale", "the dataset's examples")

    def class_names(self, info: dict[str, Any]) -> list[str] | None:
        """A classifier's class names, by class index: its logged model answers labels and probabilities.
        None: the model answers its raw output."""
        return None

    def epoch_artifacts(self, model: nn.Module, epoch: int, info: dict[str, Any], out_dir: Path) -> None:
        """Write per-epoch files (a text sample, an image grid) into `out_dir`; logged under
        `epochs/epoch_NNNN/`. Runs on rank 0 only, after the epoch's checkpoint."""

    def artifacts(self, model: nn.Module, test_batches: Iterable[Any], info: dict[str, Any],
                  out_dir: Path) -> dict[str, float] | None:
        """Write end-of-run files (plots, samples) for MLflow into `out_dir`. Runs on rank 0 only.
        May return end-of-run metrics that need the whole model (sample quality); they are logged too."""

    def artifact_metrics(self, model: nn.Module, info: dict[str, Any]) -> set[str]:
        """Names of the metrics `artifacts` returns for this model (sweeps check plot_metrics against them)."""
        return set()
