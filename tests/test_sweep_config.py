"""Sweep files: every shipped file validates; each kind of mistake is a UserError before Ray starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raycraft.errors import UserError
from raycraft.sweep.config import load_sweep

TUNE_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "tune_configs").glob("*.yaml"))
SWEEP_FILES = [p for p in TUNE_CONFIGS if not p.stem.startswith("scaling_")]
SCALING_FILES = [p for p in TUNE_CONFIGS if p.stem.startswith("scaling_")]  # `raycraft scaling` files


def _sweep(**changes):
    data = {"name": "t", "job": {"model": "mlp", "dataset": "digits", "epochs": 2},
            "space": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}, "metric": "val_accuracy", "mode": "max"}
    data.update(changes)
    return data


@pytest.mark.parametrize("path", SWEEP_FILES, ids=[p.stem for p in SWEEP_FILES])
def test_every_shipped_sweep_file_validates(path):
    sweep = load_sweep(path)
    assert sweep.config.name == path.stem
    assert sweep.space and sweep.length >= 1


@pytest.mark.parametrize("path", SCALING_FILES, ids=[p.stem for p in SCALING_FILES])
def test_every_shipped_scaling_file_validates(path):
    from raycraft.sweep.scaling_job import load_scaling

    _, points = load_scaling(path)
    assert len(points) >= 4  # enough sizes and data amounts to fit a law and hold out the largest


def test_nested_keys_model_shorthand_and_overrides():
    sweep = load_sweep(data=_sweep(space={"optim": {"lr": {"loguniform": [1e-4, 1e-2]},
                                                     "name": {"choice": ["adam", "sgd"]}},
                                           "hidden": {"grid": [[16], [64, 32]]}}),
                       overrides=["scheduler.name=asha", "epochs=3", "dropout=0.0"], samples=5)
    assert sorted(sweep.space) == ["hidden", "optim.lr", "optim.name"]
    assert sweep.config.scheduler.name == "asha" and sweep.config.samples == 5 and sweep.length == 3
    job = sweep.trial_job({"hidden": [64, 32], "optim.name": "sgd"})
    assert job["model_args"] == {"hidden": [64, 32], "dropout": 0.0} and job["optim"]["name"] == "sgd"


@pytest.mark.parametrize("changes, message", [
    ({"search": "bayes"}, r"search: 'bayes' is not valid.*optuna"),
    ({"scheduler": {"name": "ashaa"}}, r"scheduler.name: 'ashaa' is not valid. Did you mean 'asha'"),
    ({"space": {"optim.learning_rate": {"uniform": [0, 1]}}}, r"key: 'optim.learning_rate' is not valid"),
    ({"space": {"widths": {"choice": [1, 2]}}}, r"key: 'model_args.widths' is not valid"),
    ({"space": {"optim.lr": {"uniform": ["small", 1.0]}}}, r"space.optim.lr: bound 'small' is not a number"),
    ({"space": {"optim.lr": {"loguniform": [0, 0.1]}}}, r"loguniform bounds must be > 0"),
    ({"space": {"optim.lr": {"loguniform": [-1, 0.1]}}}, r"loguniform bounds must be > 0"),
    ({"space": {"optim.lr": {"uniform": [0.1, 0.01]}}}, r"needs low < high"),
    ({"space": {"batch_size": {"randint": [8, 16.5]}}}, r"bound 16.5 is not an integer"),
    ({"space": {"optim.lr": {"normal": [0, 1]}}}, r"'normal' is not valid"),
    ({"space": {"optim.name": {"choice": ["adam", "sgdd"]}}}, r"value 'sgdd' is not valid for the job"),
    ({"metric": "val_acc"}, r"metric: 'val_acc' is not valid. Did you mean 'val_accuracy'"),
    ({"metric": "test_accuracy"}, r"metric: 'test_accuracy' is not valid"),
    ({"search": "optuna", "space": {"optim.name": {"grid": ["adam", "sgd"]}}}, r"use choice instead of grid"),
    ({"search": "grid"}, r"search 'grid' enumerates values"),
    ({"space": {}}, r"no search space"),
    ({"job": {"model": "mlp"}}, r"name a model and a dataset"),
    ({"job": {"model": "mlp", "dataset": "digits", "in_process": True}}, r"job.in_process: a sweep's trials"),
    ({"scheduler": {"name": "pbt"}, "search": "optuna", "space": {"optim.lr": {"uniform": [0.01, 0.1]}}},
     r"search: pbt .* use search random or grid, not 'optuna'"),
    ({"scheduler": {"name": "pbt", "perturbation_interval": 2}}, r"perturbation_interval: 2 epochs is not less"),
    ({"scheduler": {"name": "pbt", "perturbation_interval": 1}, "space": {"hidden": {"choice": [[16], [32]]}}},
     r"space.hidden: value \[16\] changes the model's weights"),
    ({"scheduler": {"name": "pbt", "quantile_fraction": 0.75}}, r"quantile_fraction: 0.75 must be in \(0, 0.5\]"),
])
def test_bad_sweep_files_are_clear_user_errors(changes, message):
    with pytest.raises(UserError, match=message):
        load_sweep(data=_sweep(**changes))


def test_bad_yaml_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("job: [unclosed\n")
    with pytest.raises(UserError, match="bad.yaml is not valid YAML"):
        load_sweep(bad)


def test_label_noise_corrupts_only_the_training_labels():
    from raycraft.data.base import DataConfig
    from raycraft.registry import load_dataset

    clean, noisy = (load_dataset("digits", DataConfig(label_noise=f)) for f in (0.0, 0.5))
    changed = (clean.train.tensors[1] != noisy.train.tensors[1]).float().mean().item()
    assert 0.5 * 0.9 * 0.8 < changed < 0.5 * 0.9 * 1.2  # half relabelled, 9 in 10 of those to a new class
    for split in ("val", "test"):
        assert (getattr(clean, split).tensors[1] == getattr(noisy, split).tensors[1]).all()
    with pytest.raises(UserError, match="label_noise"):
        DataConfig(label_noise=1.5)


def test_train_fraction_keeps_the_first_part_of_the_training_split():
    from raycraft.data.base import DataConfig
    from raycraft.registry import load_dataset

    full, part = (load_dataset("digits", DataConfig(train_fraction=f)) for f in (1.0, 0.25))
    assert len(part.train) == round(0.25 * len(full.train)) and len(part.val) == len(full.val)
    idx = torch.tensor([0, 3])
    assert all((a == b).all() for a, b in zip(part.train[idx], full.train[idx], strict=True))


def _rl_sweep(**changes):
    data = {"name": "r", "job": {"algo": "dqn", "env": "CartPole-v1", "timesteps": 3000},
            "space": {"lr": {"loguniform": [1e-4, 1e-2]}}, "metric": "eval_return_mean", "mode": "max"}
    data.update(changes)
    return data


def test_rl_job_sweeps_rl_keys_and_counts_iterations():
    sweep = load_sweep(data=_rl_sweep(space={"lr": {"loguniform": [1e-4, 1e-2]}, "hiddens": {"choice": [[32], [64]]},
                                             "dqn": {"target_update_freq": {"choice": [100, 500]}}}),
                       overrides=["steps_per_iter=500"])
    assert sweep.kind.name == "rl" and sweep.length == 6  # 3000 env steps / 500 per iteration
    job = sweep.trial_job({"hiddens": [64], "dqn.target_update_freq": 100, "lr": 1e-3})
    assert job["model_args"] == {"hiddens": [64]} and job["dqn"] == {"target_update_freq": 100}
    assert job["steps_per_iter"] == 500


@pytest.mark.parametrize("changes, message", [
    ({"space": {"dqn.epsilon": {"uniform": [0, 1]}}}, r"key: 'dqn.epsilon' is not valid"),
    ({"metric": "val_loss"}, r"metric: 'val_loss' is not valid.*eval_return_mean"),
    ({"resources": {"gpu": True}}, r"resources.gpu: rl jobs have no such resource \(they take workers\)"),
    ({"job": {"algo": "ddpg", "env": "CartPole-v1"}}, r"DDPG needs a continuous"),
    ({"job": {"algo": "dqn"}}, r"or an algo and an env"),
    ({"scheduler": {"name": "pbt"}}, r"pbt clones trials' Ray Train checkpoints, so it runs train jobs"),
])
def test_bad_rl_sweep_files_are_clear_user_errors(changes, message):
    with pytest.raises(UserError, match=message):
        load_sweep(data=_rl_sweep(**changes))
