"""The `generative` task's Step: each model's objective, data-parallel parts, sample grids and FID.

The Step dispatches to the model's objective (`raycraft.generative.objectives`); the models themselves
(`GenerativeModel`, in `raycraft.models.generative`) hold their equations and map noise to images in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raycraft.generative.images import save_grid
from raycraft.generative.metrics import QUALITY_METRICS, fid_key, sample_quality
from raycraft.generative.objectives import objective_for
from raycraft.models.generative import GenerativeModel
from raycraft.train.step import Step, Sums, Update


class Parts(nn.Module):
    """A view of `model` for data-parallel training: `model.parts` are replaced by wrapped copies that share
    the same parameters; every other attribute is the model's own."""

    def __init__(self, model: GenerativeModel, wrap: Callable[[nn.Module], nn.Module]) -> None:
        super().__init__()
        self.module = model
        self.wrapped = nn.ModuleDict({name: wrap(getattr(model, name)) for name in model.parts})

    def __getattr__(self, name: str) -> Any:
        modules = self.__dict__["_modules"]
        if name in modules:
            return modules[name]
        if name in modules["wrapped"]:
            return modules["wrapped"][name]
        return getattr(modules["module"], name)


def base_model(net: nn.Module) -> GenerativeModel:
    return net.module if isinstance(net, Parts) else net


class GenerativeStep(Step):
    """Drives every generative model through its own objective; per-epoch sample grids; FID at the end."""

    def __init__(self) -> None:
        self.preview: torch.Tensor | None = None
        self.model: GenerativeModel | None = None  # the last model seen, for `finalize`

    def optimizer_names(self, model: nn.Module) -> tuple[str, ...]:
        return objective_for(base_model(model)).players

    def parameters(self, model: nn.Module, optimizer: str) -> Iterable[nn.Parameter]:
        base = base_model(model)
        return objective_for(base).parameters(base, optimizer)

    def distribute(self, model: nn.Module, wrap: Callable[[nn.Module], nn.Module]) -> nn.Module:
        return Parts(model, wrap)

    def start_epoch(self, model: nn.Module, epoch: int) -> None:
        base_model(model).start_epoch(epoch)

    def train_batch(self, model: nn.Module, batch: Any, update: Update) -> Sums:
        self.model = base_model(model)
        return objective_for(self.model).train_batch(self.model, model, batch[0], update)

    @torch.no_grad()
    def eval_batch(self, model: nn.Module, batch: Any) -> Sums:
        if self.preview is None:  # real images for reconstructions in the epoch grids
            self.preview = batch[0][:32].detach().cpu()
        self.model = base_model(model)
        return objective_for(self.model).eval_batch(self.model, batch[0])

    def finalize(self, means: dict[str, float]) -> dict[str, float]:
        return objective_for(self.model).finalize(self.model, means) if self.model is not None else means

    def example_input(self, batch: Any) -> torch.Tensor:
        """The logged model maps noise to images: its example input is noise, not a data batch."""
        return self.model.noise(2, torch.Generator(batch[0].device).manual_seed(0))

    def input_about(self, info: dict[str, Any]) -> str:
        return "noise from a standard normal distribution (the model's prior); it answers images in [0, 1]"

    @torch.no_grad()
    def epoch_artifacts(self, model: nn.Module, epoch: int, info: dict[str, Any], out_dir: Path) -> None:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        real = self.preview.to(device) if self.preview is not None else None
        for stem, images in model.epoch_images(real, torch.Generator(device).manual_seed(0)).items():
            save_grid(images, out_dir / f"{stem}.png")
        model.train(was_training)

    def artifact_metrics(self, model: nn.Module, info: dict[str, Any]) -> set[str]:
        return {fid_key(info["dataset"]), *QUALITY_METRICS} if model.cfg.quality_samples else set()

    @torch.no_grad()
    def artifacts(self, model: nn.Module, test_batches: Iterable[Any], info: dict[str, Any],
                  out_dir: Path) -> dict[str, float] | None:
        self.model = model
        device = next(model.parameters()).device
        save_grid(model.sample(model.cfg.grid_samples, torch.Generator(device).manual_seed(1)),
                  out_dir / "samples.png")
        if not model.cfg.quality_samples:
            return None
        images = model.sample(model.cfg.quality_samples, torch.Generator(device).manual_seed(2))
        return sample_quality(images, info)


STEP = GenerativeStep
