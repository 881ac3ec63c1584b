"""The generative family through the one loop, DDP routing, and `raycraft sample` (real Ray, MLflow, CLI)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from raycraft.generative.step import GenerativeStep
from raycraft.registry import create_model
from raycraft.train.config import build_config
from raycraft.train.loop import Updater

DIGITS = {"input_shape": (1, 8, 8), "num_classes": 10}


def cli(*args: str, uri: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    return subprocess.run([sys.executable, "-m", "raycraft.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("name", ["gan", "vae", "ddpm"])
def test_data_parallel_view_routes_every_part_through_its_wrapper(name):
    """With several workers the loop hands train_batch `step.distribute(model, DDP)`: every part the
    objective calls must go through its wrapper (DDP syncs only those gradients), on shared parameters."""
    args = ["width=8", "channel_mults=[1,2]", "timesteps=10", "sample_steps=2"] if name == "ddpm" else ["width=4"]
    cfg, model_cfg = build_config({"model": name, "dataset": "digits"}, args)
    model = create_model(name, model_cfg, DIGITS)
    calls: list[str] = []

    class Spy(nn.Module):
        def __init__(self, part: nn.Module) -> None:
            super().__init__()
            self.module = part

        def forward(self, *a):
            calls.append(next(n for n in model.parts if getattr(model, n) is self.module))
            return self.module(*a)

    step = GenerativeStep()
    view = step.distribute(model, Spy)
    updater = Updater(step, view, cfg, 10, torch.device("cpu"))
    before = [p.clone() for p in model.parameters()]
    step.train_batch(view, (torch.rand(8, 1, 8, 8),), updater)
    assert set(calls) == set(model.parts)
    assert sum(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)) > 0


@pytest.fixture(scope="module")
def non_generative_run(mlflow_uri):
    import yaml

    from raycraft.config import to_dict
    from raycraft.tracking import Run

    cfg, _ = build_config({"model": "lenet5", "dataset": "digits"})
    return Run.start(mlflow_uri, "cli", "lenet", {}, {}, yaml.safe_dump(to_dict(cfg))).run_id


@pytest.mark.parametrize("args,words", [
    (["--n", "0"], ["--n", "0", "at least 1"]),
    (["--sampler", "ddmi"], ["--sampler", "'ddmi'", "ddim"]),
    (["--n", "4"], ["RUN_ID", "lenet5", "generative"]),
])
def test_sample_bad_input_exits_2(args, words, non_generative_run, mlflow_uri, tmp_path):
    out = cli("sample", non_generative_run, *args, "--out", str(tmp_path / "g.png"), uri=mlflow_uri, cwd=tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode == 2 and "Traceback" not in text, text
    for w in words:
        assert w in text, text


@pytest.mark.slow
def test_ddpm_trains_logs_grids_and_samples_with_metrics(ray_session, mlflow_uri, storage, tmp_path):
    from raycraft.runner import run_training

    cfg, _ = build_config({"model": "ddpm", "dataset": "digits", "epochs": 1, "storage_path": storage},
                          ["timesteps=20", "width=8", "channel_mults=[1,2]", "sample_steps=4",
                           "quality_samples=40", "grid_samples=16"])
    out = run_training(cfg, tracking_uri=mlflow_uri)
    client = MlflowClient(mlflow_uri)
    paths = {a.path for d in ("epochs/epoch_0000", "plots") for a in client.list_artifacts(out.run_id, d)}
    assert {"epochs/epoch_0000/samples.png", "plots/samples.png"} <= paths
    metrics = client.get_run(out.run_id).data.metrics
    assert metrics["fid_raycraft_digits_classifier"] > 0 and 1 <= metrics["classes_covered"] <= 10

    grid = tmp_path / "grid.png"
    res = cli("sample", out.run_id, "--n", "12", "--out", str(grid), "--sampler", "ddim", "--steps", "3",
              "--metrics", uri=mlflow_uri, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert grid.stat().st_size > 100
    assert "FID (raycraft digits classifier" in res.stdout and "classes covered" in res.stdout
    bad = cli("sample", out.run_id, "--sampler", "ancestral", "--steps", "3", uri=mlflow_uri, cwd=tmp_path)
    assert bad.returncode == 2 and "--steps" in bad.stderr


@pytest.mark.slow
def test_gan_trains_with_two_ddp_workers(ray_session, mlflow_uri, storage):
    from raycraft.runner import run_training

    cfg, _ = build_config({"model": "gan", "dataset": "digits", "epochs": 1, "workers": 2, "batch_size": 128,
                           "storage_path": storage}, ["width=4", "quality_samples=0"])
    out = run_training(cfg, tracking_uri=mlflow_uri)
    assert {"train_d_loss", "train_g_loss", "val_d_loss"} <= set(out.metrics)
