"""Sample quality measured with a raycraft classifier, not Inception: numbers comparable within a dataset only.

A LeNet-5 is trained once per dataset, in-process, on that dataset's training split (default split) and
cached under `$RAYCRAFT_CACHE` (default `~/.cache/raycraft`) in `fid/<dataset>.pt`, with the mean and
covariance of its penultimate-layer features (84 units) on the test split. For generated images g:

    FID (raycraft <dataset> classifier) = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))

    mode coverage: p = histogram of the classifier's predicted classes on g;
    mode_kl = KL(p || uniform) = sum_k p_k log(K p_k)   (0 when every class is equally frequent);
    classes_covered = #classes k with p_k >= 0.2 / K     (a collapsed generator covers few).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raycraft.data.base import DataConfig, cache_dir
from raycraft.models.lenet import LeNetConfig
from raycraft.registry import create_model, load_dataset

COVERAGE_SHARE = 0.2
CLASSIFIER_EPOCHS = 8


def frechet_distance(mu1: torch.Tensor, s1: torch.Tensor, mu2: torch.Tensor, s2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)); Tr (S1 S2)^(1/2) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2)))."""
    mu1, s1, mu2, s2 = (t.double() for t in (mu1, s1, mu2, s2))
    w, v = torch.linalg.eigh(s1)
    root1 = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root1 @ s2 @ root1).clamp(min=0).sqrt().sum()
    return max(0.0, float((mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * cross))


def moments(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = features.double()
    return f.mean(0), torch.cov(f.T)


def mode_coverage(predicted: torch.Tensor, num_classes: int) -> dict[str, float]:
    p = torch.bincount(predicted.cpu(), minlength=num_classes).double()
    p = p / p.sum()
    nz = p[p > 0]
    return {"mode_kl": float((nz * (nz * num_classes).log()).sum()),
            "classes_covered": float((p >= COVERAGE_SHARE / num_classes).sum())}


class FeatureClassifier:
    """A trained LeNet-5 split into features (penultimate layer) and the class logits."""

    def __init__(self, model: nn.Module, real_mu: torch.Tensor, real_cov: torch.Tensor, accuracy: float,
                 dataset: str) -> None:
        self.model, self.real_mu, self.real_cov = model.eval(), real_mu, real_cov
        self.accuracy, self.dataset = accuracy, dataset

    @torch.no_grad()
    def features_and_classes(self, x: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
        feats, preds = [], []
        head = self.model.classifier
        for chunk in x.float().cpu().split(batch):
            f = head[:3](self.model.features(self.model.resize(chunk)))  # Flatten, F6, activation: (n, 84)
            feats.append(f)
            preds.append(head[3:](f).argmax(1))
        return torch.cat(feats), torch.cat(preds)

    def score(self, images: torch.Tensor) -> dict[str, float]:
        feats, preds = self.features_and_classes(images)
        mu, cov = moments(feats)
        return {fid_key(self.dataset): frechet_distance(self.real_mu, self.real_cov, mu, cov),
                **mode_coverage(preds, self.model.classifier[-1].out_features)}


def fid_key(dataset: str) -> str:
    """The MLflow key of "FID (raycraft <dataset> classifier)" (MLflow keys allow no parentheses)."""
    return f"fid_raycraft_{dataset}_classifier"


def _key(dataset: str, data_dir: str | None) -> str:
    if not data_dir:
        return dataset
    return f"{dataset}-{hashlib.sha1(str(Path(data_dir).resolve()).encode()).hexdigest()[:10]}"


def classifier_for(dataset: str, data_dir: str | None = None) -> FeatureClassifier:
    """The cached classifier of `dataset`, trained here on first use (a few seconds to a minute on CPU)."""
    path = cache_dir() / "fid" / f"{_key(dataset, data_dir)}.pt"
    splits = None
    if path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
        info = {"input_shape": tuple(state["input_shape"]), "num_classes": state["num_classes"]}
    else:
        splits = load_dataset(dataset, DataConfig(data_dir=data_dir))
        info = splits.info
    model = create_model("lenet5", LeNetConfig(dropout=0.1), info)
    if splits is None:
        model.load_state_dict(state["model"])
        return FeatureClassifier(model, state["real_mu"], state["real_cov"], state["accuracy"], dataset)
    clf = _train(model, splits, dataset)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".tmp") as tmp:
        torch.save({"model": model.state_dict(), "real_mu": clf.real_mu, "real_cov": clf.real_cov,
                    "accuracy": clf.accuracy, "input_shape": list(info["input_shape"]),
                    "num_classes": info["num_classes"]}, tmp.name)
    os.replace(tmp.name, path)  # atomic: concurrent runs never read half a file
    return clf


@torch.enable_grad()  # the end-of-run metrics that call this run under no_grad
def _train(model: nn.Module, splits: Any, dataset: str) -> FeatureClassifier:
    torch.manual_seed(0)
    x, y = splits.train.tensors
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(CLASSIFIER_EPOCHS):
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    xt, yt = splits.test.tensors
    clf = FeatureClassifier(model, torch.zeros(1), torch.zeros(1, 1), 0.0, dataset)
    feats, preds = clf.features_and_classes(xt)
    clf.real_mu, clf.real_cov = moments(feats)
    clf.accuracy = float((preds == yt).double().mean())
    return clf


QUALITY_METRICS = ("classes_covered", "mode_kl", "fid_classifier_test_accuracy")  # with fid_key(dataset)


def sample_quality(images: torch.Tensor, info: dict[str, Any]) -> dict[str, float]:
    """FID (raycraft classifier) and mode coverage of generated images in [0, 1]."""
    clf = classifier_for(info["dataset"], info.get("data_dir"))
    return {**clf.score(images), "fid_classifier_test_accuracy": clf.accuracy}
