"""GoogLeNet-style Inception network (Szegedy et al. 2015).

An Inception module runs four branches in parallel and concatenates them along channels:

    y = concat[ conv1x1(x),  conv3x3(conv1x1(x)),  conv5x5(conv1x1(x)),  conv1x1(maxpool3x3(x)) ]

The 1x1 'reduce' convolutions cut channels before the costly 3x3 and 5x5 filters. Widths follow
GoogLeNet's 3a, 3b, 4a, 4b, 5a modules, scaled by `width`, with a small-image stem.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from raycraft.models.layers import Resize, image_shape, num_classes
from raycraft.registry import field_doc, register_model


def conv_bn(c_in: int, c_out: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class InceptionModule(nn.Module):
    def __init__(self, c_in: int, c1: int, r3: int, c3: int, r5: int, c5: int, pool_proj: int) -> None:
        super().__init__()
        self.branch1 = conv_bn(c_in, c1, 1)
        self.branch3 = nn.Sequential(conv_bn(c_in, r3, 1), conv_bn(r3, c3, 3))
        self.branch5 = nn.Sequential(conv_bn(c_in, r5, 1), conv_bn(r5, c5, 5))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), conv_bn(c_in, pool_proj, 1))
        self.out_channels = c1 + c3 + c5 + pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, c_in, H, W) -> (N, out_channels, H, W)
        return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x), self.branch_pool(x)], dim=1)


# GoogLeNet's (c1, r3, c3, r5, c5, pool_proj) for modules 3a, 3b | pool | 4a, 4b | pool | 5a
MODULES = [(64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64), "M",
           (192, 96, 208, 16, 48, 64), (160, 112, 224, 24, 64, 64), "M",
           (256, 160, 320, 32, 128, 128)]


@dataclass
class InceptionConfig:
    width: float = field_doc(0.25, "Multiplier of GoogLeNet's branch widths.")
    dropout: float = field_doc(0.4, "Dropout before the classifier (GoogLeNet used 0.4).")


class Inception(nn.Module):
    def __init__(self, cfg: InceptionConfig, in_channels: int, n_out: int) -> None:
        super().__init__()
        def s(c: int) -> int:
            return max(4, int(round(c * cfg.width)))
        stem = s(192)
        layers: list[nn.Module] = [Resize(32), conv_bn(in_channels, stem, 3)]  # (N, stem, 32, 32)
        c = stem
        for spec in MODULES:
            if spec == "M":
                layers.append(nn.MaxPool2d(3, stride=2, padding=1))
                continue
            module = InceptionModule(c, *(s(v) for v in spec))
            layers.append(module)
            c = module.out_channels
        self.features = nn.Sequential(*layers)  # (N, c, 8, 8)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(cfg.dropout),
                                  nn.Linear(c, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, n_out)
        return self.head(self.features(x))


@register_model("inception", family="cnn", config=InceptionConfig)
def inception(cfg: InceptionConfig, data_info: dict) -> Inception:
    """GoogLeNet-style network of Inception modules (parallel 1x1, 3x3, 5x5 and pool branches)."""
    return Inception(cfg, image_shape(data_info)[0], num_classes(data_info))
