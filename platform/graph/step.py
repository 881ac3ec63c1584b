"""The graph task's Step: cross-entropy on the nodes (or graphs) a batch's mask marks."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from raycraft.classification.step import ClassificationStep


class GraphStep(ClassificationStep):
    """Cross-entropy on the nodes (or graphs) a batch's mask marks."""

    def predict(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x, edge_index, edge_attr, graph_index, y, mask = batch
        return model(x, edge_index, edge_attr, graph_index)[mask], y[mask]

    def example_input(self, batch: Any) -> None:
        return None  # a model of four tensors: the checkpoint is logged, not an exported graph


STEP = GraphStep
