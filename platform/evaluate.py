"""`raycraft eval`: reload a run's logged model and measure it on a test split, without Ray."""

from __future__ import annotations

import contextlib

import yaml

from raycraft import tracking
from raycraft.config import from_dict
from raycraft.registry import check_compatible, load_dataset, model_spec
from raycraft.train.config import TrainConfig
from raycraft.train.loop import Batches, evaluate
from raycraft.train.step import step_for


def evaluate_run(run_id: str, dataset: str | None = None, tracking_uri: str | None = None) -> dict[str, float]:
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.get_run(uri, run_id)
    cfg = from_dict(TrainConfig, yaml.safe_load(tracking.download_text(uri, run_id, "config.yaml")))
    if dataset:
        check_compatible(cfg.model, dataset)
        cfg.dataset = dataset
    model = tracking.load_model(uri, run_id)
    splits = load_dataset(cfg.dataset, cfg.data)
    step = step_for(model_spec(cfg.model).task)
    test = Batches(splits.test, cfg.batch_size, shuffle=False)
    return {f"test_{k}": v for k, v in evaluate(step, model, test, contextlib.nullcontext).items()}
