"""Building blocks shared across the zoo."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DynamicTanh(nn.Module):
    """Dynamic tanh (Zhu et al. 2025), a drop-in for a normalisation layer:

        DyT(x) = gamma * tanh(alpha * x) + beta

    with a learnable scalar alpha and per-feature gamma, beta. `channel_dim` is the feature axis
    (-1 for (..., d) activations, 1 for (N, C, H, W) maps).
    """

    def __init__(self, num_features: int, alpha_init: float = 0.5, channel_dim: int = -1) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(alpha_init))
        self.gamma = nn.Parameter(torch.ones(num_features))
        self.beta = nn.Parameter(torch.zeros(num_features))
        self.channel_dim = channel_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.ndim
        shape[self.channel_dim] = -1
        return self.gamma.view(shape) * torch.tanh(self.alpha * x) + self.beta.view(shape)


class Resize(nn.Module):
    """Resize images to `size` x `size` when they differ (8x8 digits for nets built for 32x32 input).

    Part of the model, so a logged model takes the dataset's raw images.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, C, size, size)
        if x.shape[-2:] == (self.size, self.size):
            return x
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)


def image_shape(data_info: dict) -> tuple[int, int, int]:
    shape = tuple(data_info.get("input_shape", (1, 28, 28)))
    if len(shape) != 3:
        raise ValueError(f"image models take (C, H, W) inputs, got shape {shape}")
    return shape  # type: ignore[return-value]


def num_classes(data_info: dict) -> int:
    return int(data_info.get("num_classes", 10))
