"""What a train job's model is and reports, found by building it on its data without training: the metrics a
sweep may rank, stop or plot trials by, and the weight shapes PBT compares across a space. Sweeps (their
files and job kinds) and scaling searches check their jobs with it before Ray starts."""

from __future__ import annotations

import contextlib
from typing import Any

from torch.utils.data import Dataset

from raycraft.data.base import DataSplits
from raycraft.registry import create_model, load_dataset, model_spec, step_for
from raycraft.train.config import TrainConfig
from raycraft.train.loop import Batches, evaluate

LOOP_METRICS = ("epoch", "lr", "epoch_time", "samples_per_s")


class First(Dataset):
    """A view of the first two examples of any of the loop's datasets."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return min(2, len(self.data))

    def __getitem__(self, idx):
        return self.data[idx]


def job_model(cfg: TrainConfig) -> tuple[Any, DataSplits]:
    """(the job's model, freshly initialised, the dataset's splits)."""
    splits = load_dataset(cfg.dataset, cfg.data)
    return create_model(cfg.model, cfg.model_config, splits.info), splits


def parameter_shapes(cfg: TrainConfig) -> dict[str, tuple[int, ...]]:
    """The shapes of the weights the job's model has on its dataset."""
    return {k: tuple(v.shape) for k, v in job_model(cfg)[0].state_dict().items()}


def reported_metrics(cfg: TrainConfig) -> tuple[set[str], set[str]]:
    """(per-epoch, end-of-run) metric names of a train job, found by evaluating its model on the first two
    validation examples. `test_*` and sample-quality metrics come only after the last epoch, too late to
    rank or stop trials, but a sweep may plot them."""
    model, splits = job_model(cfg)
    step = step_for(model_spec(cfg.model).task)
    names = evaluate(step, model, Batches(First(splits.val), 2, shuffle=False), contextlib.nullcontext)
    epoch = {f"{split}_{k}" for k in names for split in ("train", "val")} | set(LOOP_METRICS)
    return epoch, epoch | {f"test_{k}" for k in names} | step.artifact_metrics(model, splits.info)
