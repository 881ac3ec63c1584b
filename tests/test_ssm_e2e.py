"""End to end through the one training loop on a real local Ray and MLflow: the Kalman filter's maximum
likelihood on Nile, GCN on the karate club, the deep Kalman filter on a known nonlinear system."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from raycraft.data.timeseries import simulate_nonlinear
from raycraft.registry import create_model, load_dataset
from raycraft.runner import run_training
from raycraft.train.config import build_config
from raycraft.train.loop import load_state

pytestmark = pytest.mark.slow


def _artifacts(uri: str, run_id: str, folder: str) -> set[str]:
    return {a.path for a in MlflowClient(uri).list_artifacts(run_id, folder)}


def _trained(out, uri: str, tmp_path, model_cfg: tuple):
    """The run's final model, rebuilt from the checkpoint it logged to MLflow."""
    local = MlflowClient(uri).download_artifacts(out.run_id, "checkpoint", str(tmp_path))
    cfg, mcfg = model_cfg
    model = create_model(cfg.model, mcfg, load_dataset(cfg.dataset, cfg.data).info)
    model.load_state_dict(load_state(local)["model"])
    return model.eval()


def test_kalman_mle_on_nile_through_the_training_loop(ray_session, mlflow_uri, storage):
    sm = pytest.importorskip("statsmodels.api")
    cfg, _ = build_config({"model": "kalman", "dataset": "nile", "storage_path": storage,
                           "data": {"val_fraction": 0.0, "test_fraction": 0.0}})
    out = run_training(cfg, tracking_uri=mlflow_uri)
    ref = sm.tsa.UnobservedComponents(sm.datasets.nile.load_pandas().data["volume"].to_numpy(float),
                                      "local level").fit(disp=0)
    assert out.metrics["train_var_obs_0"] == pytest.approx(ref.params[0], rel=0.03)
    assert out.metrics["train_var_state_0"] == pytest.approx(ref.params[1], rel=0.03)
    assert {"plots/states.png", "plots/forecast.png", "plots/curves.png"} <= _artifacts(mlflow_uri, out.run_id,
                                                                                        "plots")


def test_gcn_classifies_the_karate_club(ray_session, mlflow_uri, storage):
    cfg, _ = build_config({"model": "gcn", "dataset": "karate", "storage_path": storage})
    out = run_training(cfg, tracking_uri=mlflow_uri)
    assert out.metrics["test_accuracy"] >= 0.9
    assert "plots/confusion_matrix.png" in _artifacts(mlflow_uri, out.run_id, "plots")


def test_deep_kalman_recovers_a_nonlinear_latent_state(ray_session, mlflow_uri, storage, tmp_path):
    built = build_config({"model": "deep_kalman", "dataset": "nonlinear_latent", "storage_path": storage,
                          "epochs": 15}, ["latent_dim=1"])
    out = run_training(built[0], tracking_uri=mlflow_uri)
    history = [m.value for m in sorted(MlflowClient(mlflow_uri).get_metric_history(out.run_id, "train_loss"),
                                       key=lambda m: m.step)]
    assert history[-1] < history[0] - 10  # the negative ELBO per step falls
    model = _trained(out, mlflow_uri, tmp_path, built)
    y, z = simulate_nonlinear(seed=0)
    with torch.no_grad():
        mu = model.posterior_mean(torch.from_numpy(y))[..., 0].numpy()
    assert abs(np.corrcoef(mu.ravel(), z.ravel())[0, 1]) >= 0.9
    assert {"plots/latent.png", "plots/reconstruction.png"} <= _artifacts(mlflow_uri, out.run_id, "plots")
