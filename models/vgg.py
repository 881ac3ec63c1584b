"""VGG (Simonyan & Zisserman 2014): stacks of 3x3 convolutions, doubling width after each 2x2 max pool.

Two stacked 3x3 convolutions see a 5x5 field with fewer parameters (2 * 9C^2 < 25C^2) and one more
nonlinearity. Configurations A (VGG-11) and D (VGG-16); 'M' is a max pool. On 32x32 input five pools
leave 1x1 maps, so the classifier is a small MLP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from raycraft.models.layers import Resize, image_shape, num_classes
from raycraft.registry import field_doc, register_model

LAYOUTS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


@dataclass
class VGGConfig:
    width: float = field_doc(0.25, "Multiplier of the paper's widths (64 ... 512).")
    batch_norm: bool = field_doc(True, "Batch norm after each convolution (not in the paper; trains faster).")
    hidden: int = field_doc(256, "Units of the two hidden classifier layers (4096 in the paper).")
    dropout: float = field_doc(0.5, "Dropout in the classifier.")


class VGG(nn.Module):
    def __init__(self, layout: list, cfg: VGGConfig, in_channels: int, n_out: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [Resize(32)]
        c = in_channels
        for item in layout:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            out = max(8, int(round(item * cfg.width)))
            layers.append(nn.Conv2d(c, out, 3, padding=1))
            if cfg.batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU(inplace=True))
            c = out
        self.features = nn.Sequential(*layers)  # (N, c, 1, 1)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c, cfg.hidden), nn.ReLU(inplace=True), nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU(inplace=True), nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, n_out)
        return self.classifier(self.features(x))


@register_model("vgg11", family="cnn", config=VGGConfig)
def vgg11(cfg: VGGConfig, data_info: dict) -> VGG:
    """VGG-11 (configuration A): 8 convolutions of 3x3 in 5 pooled stages."""
    return VGG(LAYOUTS["vgg11"], cfg, image_shape(data_info)[0], num_classes(data_info))


@register_model("vgg16", family="cnn", config=VGGConfig)
def vgg16(cfg: VGGConfig, data_info: dict) -> VGG:
    """VGG-16 (configuration D): 13 convolutions of 3x3 in 5 pooled stages."""
    return VGG(LAYOUTS["vgg16"], cfg, image_shape(data_info)[0], num_classes(data_info))
