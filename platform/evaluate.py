"""`raycraft eval`: reload a run's logged model and measure it on a test split, without Ray."""

from __future__ import annotations

import contextlib
import tempfile
from typing import Any

from torch import nn

from raycraft import tracking
from raycraft.config import from_dict, read_yaml
from raycraft.errors import UserError
from raycraft.registry import ModelSpec, check_compatible, create_model, load_dataset, model_spec, models, step_for
from raycraft.train.config import TrainConfig
from raycraft.train.loop import CHECKPOINT_FILE, Batches, evaluate, load_state


def run_config(uri: str, run_id: str, task: str | None = None, command: str = "") -> tuple[TrainConfig, ModelSpec]:
    """A run's TrainConfig and model spec; with `task`, a UserError unless the run's model is of that task."""
    if tracking.get_run(uri, run_id).data.tags.get(tracking.TASK_TAG) == "rl":
        raise UserError(f"RUN_ID: run {run_id!r} is a `raycraft rl` run: play its policy with `raycraft rl-eval "
                        f"{run_id}`, or load it with mlflow.pyfunc.load_model('runs:/{run_id}/model').")
    text = tracking.download_text(uri, run_id, "config.yaml")
    cfg = from_dict(TrainConfig, read_yaml(text, f"run {run_id}'s config.yaml"))
    spec = model_spec(cfg.model)
    if task and spec.task != task:
        fits = sorted(name for name, s in models().items() if s.task == task)
        raise UserError(f"RUN_ID: run {run_id!r} trained {cfg.model!r}, a {spec.task} model; {command} needs a "
                        f"{task} model ({', '.join(fits)}).")
    return cfg, spec


def rebuild_model(uri: str, run_id: str, cfg: TrainConfig, info: dict[str, Any]) -> nn.Module:
    """The run's model rebuilt from its config and final checkpoint (weights only, no pickle), in eval mode:
    unlike the logged torch.export graph it takes any sampler, step count or input length."""
    with tempfile.TemporaryDirectory() as tmp:
        state = load_state(tracking.download_artifact(uri, run_id, f"checkpoint/{CHECKPOINT_FILE}", tmp).parent)
    model = create_model(cfg.model, cfg.model_config, info)
    model.load_state_dict(state["model"])
    return model.eval()


def evaluate_run(run_id: str, dataset: str | None = None, tracking_uri: str | None = None) -> dict[str, float]:
    uri = tracking.resolve_tracking_uri(tracking_uri)
    cfg, _ = run_config(uri, run_id)
    trained_on = cfg.dataset
    if dataset:
        check_compatible(cfg.model, dataset)
        cfg.dataset = dataset
    splits = load_dataset(cfg.dataset, cfg.data)
    if cfg.dataset != trained_on:
        check_same_shapes(trained_on, load_dataset(trained_on, cfg.data).info, cfg.dataset, splits.info)
    model = tracking.load_model(uri, run_id)
    step = step_for(model_spec(cfg.model).task)
    test = Batches(splits.test, cfg.batch_size, shuffle=False)
    return {f"test_{k}": v for k, v in evaluate(step, model, test, contextlib.nullcontext).items()}


SHAPE_KEYS = ("input_shape", "num_classes", "num_features", "edge_dim", "level", "obs_dim", "vocab_size")
"""The entries of a dataset's `info` that a model is built for: another dataset must match them all."""


def check_same_shapes(trained_on: str, trained: dict[str, Any], dataset: str, info: dict[str, Any]) -> None:
    """UserError unless `dataset`'s shapes are those of `trained_on`, the data the run's model was built for."""
    for key in SHAPE_KEYS:
        if key in trained and trained[key] != info.get(key):
            raise UserError(f"--dataset: the run's model was built for {trained_on!r} ({key} {trained[key]}); "
                            f"{dataset!r} has {key} {info.get(key)}. Evaluate on a dataset of the same shapes.")
