"""What every generative model offers the one loop, and the `generative` task's Step.

A generative model is an `nn.Module` whose `forward(noise)` maps noise to images in [0, 1] (the logged
model), and which knows its own objective: `train_batch(net, x, update)` takes `net`, the module to call
parts through (the model itself, or under data parallelism a view whose parts are DDP-wrapped), so
gradients of every part are synchronised across workers. Pixels arrive in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raycraft.errors import UserError
from raycraft.registry import field_doc
from raycraft.train.step import Step, Sums, Update


@dataclass
class GenerativeConfig:
    """Fields every generative model has."""

    quality_samples: int = field_doc(1000, "Samples drawn at the end of a run for the FID and mode-coverage "
                                           "metrics (0 skips them).", minimum=0)
    grid_samples: int = field_doc(64, "Samples in each epoch's image grid.")

    def __post_init__(self) -> None:
        if self.quality_samples < 0 or self.grid_samples < 1:
            raise UserError(f"quality_samples: {self.quality_samples} must be >= 0 and grid_samples: "
                            f"{self.grid_samples} >= 1.")


class GenerativeModel(nn.Module):
    players: tuple[str, ...] = ("main",)
    """Optimizer names; `player_parameters(name)` says which parameters each one steps."""
    parts: tuple[str, ...] = ()
    """Submodules called directly in `train_batch`; each is DDP-wrapped on its own."""

    def __init__(self, cfg: GenerativeConfig, shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.cfg, self.shape = cfg, tuple(shape)

    def player_parameters(self, name: str) -> Iterable[nn.Parameter]:
        return self.parameters()

    def train_batch(self, net: nn.Module, x: torch.Tensor, update: Update) -> Sums:
        raise NotImplementedError

    def eval_batch(self, x: torch.Tensor) -> Sums:
        raise NotImplementedError

    def finalize(self, means: dict[str, float]) -> dict[str, float]:
        return means

    def start_epoch(self, epoch: int) -> None:
        """Annealing schedules read the epoch here."""

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator | None = None, **sampler: Any) -> torch.Tensor:
        """n images in [0, 1], shaped (n, C, H, W)."""
        return self(self.noise(n, generator))

    def epoch_images(self, real: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Image grids for this epoch, by file stem: samples, plus reconstructions etc. where they exist."""
        return {"samples": self.sample(self.cfg.grid_samples, generator)}


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
        return base_model(model).players

    def parameters(self, model: nn.Module, optimizer: str) -> Iterable[nn.Parameter]:
        return base_model(model).player_parameters(optimizer)

    def distribute(self, model: nn.Module, wrap: Callable[[nn.Module], nn.Module]) -> nn.Module:
        return Parts(model, wrap)

    def start_epoch(self, model: nn.Module, epoch: int) -> None:
        base_model(model).start_epoch(epoch)

    def train_batch(self, model: nn.Module, batch: Any, update: Update) -> Sums:
        self.model = base_model(model)
        return self.model.train_batch(model, batch[0], update)

    @torch.no_grad()
    def eval_batch(self, model: nn.Module, batch: Any) -> Sums:
        if self.preview is None:  # real images for reconstructions in the epoch grids
            self.preview = batch[0][:32].detach().cpu()
        self.model = base_model(model)
        return self.model.eval_batch(batch[0])

    def finalize(self, means: dict[str, float]) -> dict[str, float]:
        return self.model.finalize(means) if self.model is not None else means

    def example_input(self, batch: Any) -> torch.Tensor:
        """The logged model maps noise to images: its example input is noise, not a data batch."""
        return self.model.noise(2, torch.Generator(batch[0].device).manual_seed(0))

    @torch.no_grad()
    def epoch_artifacts(self, model: nn.Module, epoch: int, info: dict[str, Any], out_dir: Path) -> None:
        from raycraft.generative.images import save_grid

        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        real = self.preview.to(device) if self.preview is not None else None
        for stem, images in model.epoch_images(real, torch.Generator(device).manual_seed(0)).items():
            save_grid(images, out_dir / f"{stem}.png")
        model.train(was_training)

    def artifact_metrics(self, model: nn.Module, info: dict[str, Any]) -> set[str]:
        from raycraft.generative.metrics import QUALITY_METRICS, fid_key

        return {fid_key(info["dataset"]), *QUALITY_METRICS} if model.cfg.quality_samples else set()

    @torch.no_grad()
    def artifacts(self, model: nn.Module, test_batches: Iterable[Any], info: dict[str, Any],
                  out_dir: Path) -> dict[str, float] | None:
        from raycraft.generative.images import save_grid
        from raycraft.generative.metrics import sample_quality

        self.model = model
        device = next(model.parameters()).device
        save_grid(model.sample(model.cfg.grid_samples, torch.Generator(device).manual_seed(1)),
                  out_dir / "samples.png")
        if not model.cfg.quality_samples:
            return None
        images = model.sample(model.cfg.quality_samples, torch.Generator(device).manual_seed(2))
        return sample_quality(images, info)


STEP = GenerativeStep
