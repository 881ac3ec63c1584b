"""What every generative model is: noise in, images in [0, 1] out, built from parts the objective calls.

A generative model is an `nn.Module` whose `forward(noise)` maps noise to images in [0, 1] (the logged
model). It holds its objective's equations as named methods (a GAN's discriminator and generator losses,
the VAE's ELBO terms, DDPM's L_simple); how they are optimised (which optimizer steps when, which sums
become metrics) is the training platform's: `raycraft.generative.objectives`. Those methods take `net`,
the module to call parts through: the model itself, or under data parallelism a view whose `parts` are
DDP-wrapped, so gradients of every part are synchronised across workers. Pixels arrive in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from raycraft.errors import UserError
from raycraft.registry import field_doc


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
    parts: tuple[str, ...] = ()
    """Submodules the objective calls directly; each is DDP-wrapped on its own."""

    def __init__(self, cfg: GenerativeConfig, shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.cfg, self.shape = cfg, tuple(shape)

    def start_epoch(self, epoch: int) -> None:
        """Annealing schedules read the epoch here."""

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator | None = None, **sampler: Any) -> torch.Tensor:
        """n images in [0, 1], shaped (n, C, H, W)."""
        return self(self.noise(n, generator))

    def epoch_images(self, real: torch.Tensor | None, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Image grids for this epoch, by file stem: samples, plus reconstructions etc. where they exist."""
        return {"samples": self.sample(self.cfg.grid_samples, generator)}
