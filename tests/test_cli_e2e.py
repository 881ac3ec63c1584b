"""The README's main commands as a user runs them: `raycraft train`, then `raycraft eval` on its run id."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.slow


def test_cli_train_then_eval(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # default store: ./mlflow.db
    cli = [sys.executable, "-m", "raycraft.cli"]
    train = subprocess.run([*cli, "train", "lenet5", "--dataset", "digits", "--epochs", "2"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-4000:]
    out = train.stdout
    epoch_lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in epoch_lines] == ["1/2", "2/2"]
    for key in ("train_loss", "val_loss", "val_accuracy", "samples_per_s"):
        assert all(re.search(rf"\b{key} [\d.,e+-]+", line) for line in epoch_lines), key
    run_id = re.search(r"run id: (\w{32})", out).group(1)
    test_acc = re.search(r"final: .*test_accuracy ([\d.]+)", out).group(1)
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db" in out
    experiment = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id).info.experiment_id
    assert f"then open http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run_id}" in out  # the run's page
    assert (tmp_path / "mlflow.db").is_file() and (tmp_path / "mlartifacts").is_dir()

    evaluated = subprocess.run([*cli, "eval", run_id], cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert f"test_accuracy {test_acc}" in evaluated.stdout
