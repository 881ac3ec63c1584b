"""The scaling command's analysis on a real MLflow store, with losses drawn from a known law."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from raycraft import tracking
from raycraft.errors import UserError
from raycraft.sweep.scaling_job import analyse, load_scaling, log_analysis


def _file(tmp_path, **changes):
    data = {"job": {"model": "mlp", "dataset": "digits", "model_args": {"norm": "none"}},
            "sizes": [{"hidden": [w]} for w in (4, 8, 16, 32, 64)],
            "data": [{"epochs": e} for e in (1, 2, 4)], "metric": "val_loss", "holdout": 1, "budget": 1e12}
    data.update(changes)
    path = tmp_path / "scaling_mlp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_sizes_data_and_fits_on_a_known_law(tmp_path, mlflow_uri):
    cfg, points = load_scaling(_file(tmp_path))
    assert len(points) == 15 and cfg.name == "scaling_mlp"
    # N: weights and biases of 64 -> w -> 10; D: epochs x training examples (one label each)
    assert points[0].n == 64 * 4 + 4 + 4 * 10 + 10
    assert points[1].d == 2 * points[0].d
    rng = np.random.default_rng(0)
    for p in points:
        p.loss = (1.0 + 300 / p.n ** 0.5 + 900 / p.d ** 0.6) * np.exp(rng.normal(0, 0.002))
    result = analyse(cfg, points)
    assert result.fits["L_ND"].params["alpha"] == pytest.approx(0.5, rel=0.05)
    assert result.fits["L_ND"].params["beta"] == pytest.approx(0.6, rel=0.05)
    assert result.held_out["L_ND"] < 0.02
    assert result.fits["L_D"].params["alpha"] > 0 and "E" not in result.fits["L_D"].params  # 3 D values: no E
    assert "E" in result.fits["L_N"].params  # 4 fitted sizes: with E
    n_opt, d_opt = result.optimal
    assert 6 * n_opt * d_opt == pytest.approx(1e12)

    parent = tracking.Run.start(mlflow_uri, "scaling-test", "p", {}, {}, "")
    log_analysis(parent, cfg, points, result)
    run = MlflowClient(mlflow_uri).get_run(parent.run_id)
    assert run.data.metrics["L_ND.alpha"] == pytest.approx(result.fits["L_ND"].params["alpha"])
    assert "L_ND.alpha_stderr" in run.data.metrics and "heldout_rel_error.L_ND" in run.data.metrics
    assert {a.path for a in MlflowClient(mlflow_uri).list_artifacts(parent.run_id, "scaling")} == {
        "scaling/runs.yaml", "scaling/scaling_loglog.png"}


def test_bad_scaling_files(tmp_path):
    with pytest.raises(UserError, match="leave 3 to fit"):
        load_scaling(_file(tmp_path, sizes=[{"hidden": [w]} for w in (4, 8, 16, 32)]))
    with pytest.raises(UserError, match="L\\(D\\) needs at least 3"):
        load_scaling(_file(tmp_path, data=[{"epochs": 1}, {"epochs": 2}]))
    with pytest.raises(UserError, match="metric: 'val_perplexity' is not valid"):
        load_scaling(_file(tmp_path, metric="val_perplexity"))
    with pytest.raises(UserError, match=r"sizes\[0\].*hidden"):
        load_scaling(_file(tmp_path, sizes=[{"hidden": "wide"}] * 5))
