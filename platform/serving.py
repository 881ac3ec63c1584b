"""How a logged classifier answers when served (`mlflow models serve`, `mlflow.pyfunc.load_model`): MLflow's
"models from code". `raycraft.tracking` logs this file as the model's code and the trained network beside it
(`mlflow.pytorch`'s torch.export program, artifact `network`); MLflow runs this file to load the model, so no
Python object is pickled. The network loads as `mlflow.pytorch` loads it (with
MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false it first checks that the archive holds tensors only).

For each example of a batch (a float32 tensor of the shape and scale that the model's description and
metadata state) the model answers its class index (`label`), the class's name (`class`) and the softmax
probability of every class (`probabilities`, in class order); the parameter `logits=true` adds the
network's raw scores (`logits`).

This file runs wherever the model is served: it imports MLflow, torch and numpy, and nothing of raycraft.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import torch


def answer(network, classes: list[str], batch: np.ndarray, logits: bool = False) -> pd.DataFrame:
    """The answer for each example of `batch`: `label`, `class`, `probabilities` (and `logits` if asked)."""
    with torch.no_grad():
        scores = network(torch.from_numpy(np.asarray(batch, dtype=np.float32))).float()
    probabilities = torch.softmax(scores, dim=-1)
    labels = probabilities.argmax(dim=-1).tolist()
    out = pd.DataFrame({"label": labels, "class": [classes[i] for i in labels],
                        "probabilities": probabilities.tolist()})
    if logits:
        out["logits"] = scores.tolist()
    return out


def describe(classes: list[str]) -> str:
    """What the served model answers, for its description."""
    shown = ", ".join(classes[:20]) + (f", ... ({len(classes)} in all)" if len(classes) > 20 else "")
    return (f"It answers, for each example, `label` (the class index), `class` (its name: {shown}) and "
            "`probabilities` (one per class, in class order); the parameter logits=true adds the raw scores "
            "(`logits`).")


class Classifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.network = mlflow.pytorch.load_model(context.artifacts["network"])
        self.classes = list(context.model_config["classes"])

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> pd.DataFrame:
        # an ndarray hint: MLflow keeps the logged signature (it derives none from it) and enforces it
        return answer(self.network, self.classes, model_input, bool(params and params.get("logits")))


mlflow.models.set_model(Classifier())
