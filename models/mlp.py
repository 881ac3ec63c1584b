"""Multilayer perceptron: h_{l+1} = phi(W_l h_l + b_l), logits = W_L h_L + b_L.

Weights use He initialisation, W ~ N(0, 2 / fan_in), which keeps the variance of ReLU activations
constant across layers. Each hidden layer can be normalised by batch norm or by dynamic tanh.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from raycraft.models.layers import DynamicTanh, num_classes
from raycraft.registry import field_doc, register_model


@dataclass
class MLPConfig:
    hidden: tuple[int, ...] = field_doc((256, 128), "Width of each hidden layer.")
    norm: Literal["none", "batch", "dyt"] = field_doc("batch", "Per-layer normalisation: batch norm or dynamic tanh.")
    dropout: float = field_doc(0.1, "Dropout after each hidden layer.")
    activation: Literal["relu", "gelu", "tanh"] = field_doc("relu", "Hidden nonlinearity phi.")


ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class MLP(nn.Module):
    def __init__(self, cfg: MLPConfig, in_features: int, n_out: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in cfg.hidden:
            layers.append(nn.Linear(width, h))
            if cfg.norm == "batch":
                layers.append(nn.BatchNorm1d(h))
            elif cfg.norm == "dyt":
                layers.append(DynamicTanh(h))
            layers += [ACTIVATIONS[cfg.activation](), nn.Dropout(cfg.dropout)]
            width = h
        layers.append(nn.Linear(width, n_out))
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Linear):  # He: W ~ N(0, 2 / fan_in)
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, ...) -> (N, n_out)
        return self.net(x)


@register_model("mlp", family="mlp", config=MLPConfig)
def mlp(cfg: MLPConfig, data_info: dict) -> MLP:
    """Multilayer perceptron with He init, batch norm or dynamic tanh, and dropout, on images (flattened) or
    feature vectors (a table's rows)."""
    return MLP(cfg, math.prod(data_info.get("input_shape", (1, 28, 28))), num_classes(data_info))
