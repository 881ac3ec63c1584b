"""EfficientNet (Tan & Le 2019): MBConv blocks scaled in depth, width and resolution together.

Compound scaling with coefficient phi:

    depth d = alpha^phi,  width w = beta^phi,  resolution r = gamma^phi,
    alpha = 1.2, beta = 1.1, gamma = 1.15,  with alpha * beta^2 * gamma^2 ~= 2

so each step of phi about doubles the FLOPs. An MBConv block is an inverted residual: 1x1 expansion by
t, a k x k depthwise convolution, squeeze-and-excitation, a 1x1 linear projection, and the identity
added when shapes match. B0's stages are below; `base_resolution` replaces the paper's 224 for small
images (the input is resized to round(base_resolution * r)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from raycraft.models.layers import Resize, image_shape, num_classes
from raycraft.registry import field_doc, register_model

# B0 stages: (expansion t, channels, repeats, stride, kernel)
B0_STAGES = [(1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 40, 2, 2, 5), (6, 80, 3, 2, 3),
             (6, 112, 3, 1, 5), (6, 192, 4, 2, 5), (6, 320, 1, 1, 3)]
ALPHA, BETA, GAMMA = 1.2, 1.1, 1.15


@dataclass
class EfficientNetConfig:
    phi: float = field_doc(0.0, "Compound coefficient: depth x 1.2^phi, width x 1.1^phi, resolution x 1.15^phi.")
    base_resolution: int = field_doc(32, "Input side at phi = 0 (224 in the paper; 32 suits small images).")
    width: float = field_doc(0.5, "Extra width multiplier on top of beta^phi (1.0 = B0's channels).")
    dropout: float = field_doc(0.2, "Dropout before the classifier.")
    se_ratio: float = field_doc(0.25, "Squeeze-and-excitation bottleneck as a fraction of the block input.")


def round_channels(c: float, divisor: int = 8) -> int:
    return max(divisor, int(c + divisor / 2) // divisor * divisor)


class SqueezeExcite(nn.Module):
    """s = sigmoid(W_2 swish(W_1 avgpool(x))), y = s * x: channel weights from global context."""

    def __init__(self, c: int, c_squeeze: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c_squeeze, 1), nn.SiLU(),
                                  nn.Conv2d(c_squeeze, c, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class MBConv(nn.Module):
    def __init__(self, c_in: int, c_out: int, t: int, stride: int, k: int, se_ratio: float) -> None:
        super().__init__()
        mid = c_in * t
        layers: list[nn.Module] = []
        if t != 1:
            layers += [nn.Conv2d(c_in, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.SiLU()]
        layers += [nn.Conv2d(mid, mid, k, stride, k // 2, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.SiLU(),
                   SqueezeExcite(mid, max(1, int(c_in * se_ratio))),
                   nn.Conv2d(mid, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_residual else y


class EfficientNet(nn.Module):
    def __init__(self, cfg: EfficientNetConfig, in_channels: int, n_out: int) -> None:
        super().__init__()
        d, w, r = ALPHA ** cfg.phi, BETA ** cfg.phi * cfg.width, GAMMA ** cfg.phi
        self.resolution = int(round(cfg.base_resolution * r))
        small = self.resolution <= 64
        stem = round_channels(32 * w)
        layers: list[nn.Module] = [Resize(self.resolution),
                                   nn.Conv2d(in_channels, stem, 3, 1 if small else 2, 1, bias=False),
                                   nn.BatchNorm2d(stem), nn.SiLU()]
        c = stem
        for t, ch, repeats, stride, k in B0_STAGES:
            c_out = round_channels(ch * w)
            for i in range(int(math.ceil(repeats * d))):
                layers.append(MBConv(c, c_out, t, stride if i == 0 else 1, k, cfg.se_ratio))
                c = c_out
        head = round_channels(1280 * w)
        layers += [nn.Conv2d(c, head, 1, bias=False), nn.BatchNorm2d(head), nn.SiLU()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(cfg.dropout),
                                        nn.Linear(head, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, n_out)
        return self.classifier(self.features(x))


@register_model("efficientnet_b0", family="cnn", config=EfficientNetConfig)
def efficientnet_b0(cfg: EfficientNetConfig, data_info: dict) -> EfficientNet:
    """EfficientNet-B0 of MBConv blocks with compound scaling by phi (depth, width, resolution)."""
    return EfficientNet(cfg, image_shape(data_info)[0], num_classes(data_info))
