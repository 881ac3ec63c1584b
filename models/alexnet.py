"""AlexNet (Krizhevsky et al. 2012), scaled for small images.

Five convolutions with ReLU, max pooling after the 1st, 2nd and 5th, then two dropout-regularised
fully connected layers. The 11x11/stride-4 first layer suits 224x224 photos; on 32x32 input it is a
3x3/stride-1 convolution, and widths are scaled by `width` (1.0 = the paper's 64-192-384-256-256).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from raycraft.models.layers import Resize, image_shape, num_classes
from raycraft.registry import field_doc, register_model


@dataclass
class AlexNetConfig:
    width: float = field_doc(0.5, "Multiplier of the paper's channel widths (64, 192, 384, 256, 256).")
    hidden: int = field_doc(1024, "Units of each fully connected layer (4096 in the paper).")
    dropout: float = field_doc(0.5, "Dropout before each fully connected layer.")


class AlexNet(nn.Module):
    def __init__(self, cfg: AlexNetConfig, in_channels: int, n_out: int) -> None:
        super().__init__()
        c1, c2, c3, c4, c5 = (max(8, int(round(w * cfg.width))) for w in (64, 192, 384, 256, 256))
        self.resize = Resize(32)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # 16x16
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),           # 8x8
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c3, c4, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c4, c5, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),           # 4x4
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(cfg.dropout), nn.Linear(c5 * 16, cfg.hidden), nn.ReLU(inplace=True),
            nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU(inplace=True),
            nn.Linear(cfg.hidden, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, n_out)
        return self.classifier(self.features(self.resize(x)))


@register_model("alexnet", family="cnn", config=AlexNetConfig)
def alexnet(cfg: AlexNetConfig, data_info: dict) -> AlexNet:
    """AlexNet: five ReLU convolutions and two dropout FC layers, scaled to 32x32 input."""
    return AlexNet(cfg, image_shape(data_info)[0], num_classes(data_info))
