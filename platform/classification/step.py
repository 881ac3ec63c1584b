"""The classification task's Step (MLPs and CNNs; the graph task builds on it)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raycraft.plots import confusion_matrix_png
from raycraft.train.step import Step, Sums, Update


class ClassificationStep(Step):
    """Cross-entropy classification: loss = -log softmax(f(x))_y, metrics loss and accuracy.
    A family whose batches are not (x, y) overrides `predict`."""

    def predict(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, targets) of the examples a batch scores."""
        x, y = batch
        return model(x), y

    def train_batch(self, model: nn.Module, batch: Any, update: Update) -> Sums:
        logits, y = self.predict(model, batch)
        loss = F.cross_entropy(logits, y)
        update("main", loss)
        n = y.new_tensor(len(y))
        return {"loss": loss.detach() * n, "accuracy": (logits.argmax(-1) == y).sum(), "n": n}

    @torch.no_grad()
    def eval_batch(self, model: nn.Module, batch: Any) -> Sums:
        logits, y = self.predict(model, batch)
        n = y.new_tensor(len(y))
        return {"loss": F.cross_entropy(logits, y, reduction="sum"), "accuracy": (logits.argmax(-1) == y).sum(),
                "n": n}

    def class_names(self, info: dict[str, Any]) -> list[str]:
        return info.get("class_names") or [str(i) for i in range(info["num_classes"])]

    @torch.no_grad()
    def artifacts(self, model: nn.Module, test_batches: Iterable[Any], info: dict[str, Any],
                  out_dir: Path) -> None:
        ys, preds = [], []
        for batch in test_batches:
            logits, y = self.predict(model, batch)
            preds.append(logits.argmax(-1).cpu())
            ys.append(y.cpu())
        confusion_matrix_png(torch.cat(ys), torch.cat(preds), info.get("class_names"),
                             out_dir / "confusion_matrix.png")


STEP = ClassificationStep
