"""Residual networks (He et al. 2016): each block learns a residual F and adds the identity,

    y = relu( F(x, {W_i}) + W_s x ),   F = BN(conv3x3(relu(BN(conv3x3(x)))))

where W_s is the identity, or a 1x1 projection when the block changes shape. ResNet-18 stacks
(2, 2, 2, 2) basic blocks in four stages of widths 64-128-256-512; ResNet-34 stacks (3, 4, 6, 3).
Small images (<= 64 px) get a 3x3 stride-1 stem without the max pool, as for CIFAR.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from raycraft.models.layers import image_shape, num_classes
from raycraft.registry import field_doc, register_model


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out))
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))  # W_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.residual(x) + self.shortcut(x))


@dataclass
class ResNetConfig:
    width: int = field_doc(64, "Channels of the first stage (64 in the paper); later stages double it.")
    zero_init_residual: bool = field_doc(True, "Start each residual branch's last BN at 0, so blocks begin "
                                               "as identities.")


class ResNet(nn.Module):
    def __init__(self, blocks: tuple[int, ...], cfg: ResNetConfig, in_shape: tuple[int, int, int],
                 n_out: int) -> None:
        super().__init__()
        c_in, h, _ = in_shape
        w = cfg.width
        if h <= 64:
            self.stem = nn.Sequential(nn.Conv2d(c_in, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w),
                                      nn.ReLU(inplace=True))
        else:
            self.stem = nn.Sequential(nn.Conv2d(c_in, w, 7, 2, 3, bias=False), nn.BatchNorm2d(w),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        stages, c = [], w
        for i, n in enumerate(blocks):
            c_out = w * 2 ** i
            for j in range(n):
                stages.append(BasicBlock(c, c_out, 2 if (j == 0 and i > 0) else 1))
                c = c_out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, n_out))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if cfg.zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.residual[-1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, n_out)
        return self.head(self.stages(self.stem(x)))


RECIPE = {"epochs": 6, "optim": {"lr": 2e-3, "weight_decay": 0.05, "warmup_epochs": 1}}


@register_model("resnet18", family="cnn", config=ResNetConfig, recipe=RECIPE)
def resnet18(cfg: ResNetConfig, data_info: dict) -> ResNet:
    """ResNet-18: basic residual blocks (2, 2, 2, 2) with identity or 1x1-projection shortcuts."""
    return ResNet((2, 2, 2, 2), cfg, image_shape(data_info), num_classes(data_info))


@register_model("resnet34", family="cnn", config=ResNetConfig, recipe=RECIPE)
def resnet34(cfg: ResNetConfig, data_info: dict) -> ResNet:
    """ResNet-34: basic residual blocks (3, 4, 6, 3) with identity or 1x1-projection shortcuts."""
    return ResNet((3, 4, 6, 3), cfg, image_shape(data_info), num_classes(data_info))
