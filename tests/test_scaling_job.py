"""The scaling command's analysis on a real MLflow store, with losses drawn from a known law."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from raycraft import tracking
from raycraft.errors import UserError
from raycraft.sweep.config import POINT
from raycraft.sweep.engine import STATE_FILE, sweep_dir, sweep_state
from raycraft.sweep.scaling_job import analyse, as_sweep, check_unchanged, load_scaling, log_analysis


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
        "scaling/scaling_loglog.png"}


def test_flops_counted_by_torch_beside_6nd(tmp_path):
    """For 64 -> 4 -> 10 each example costs 2 x in x out FLOPs per linear layer forward, and as much for each
    gradient backward: the weights' of both layers and the hidden activations' (the input needs none)."""
    _, points = load_scaling(_file(tmp_path))
    per_example = 2 * 64 * 4 * 2 + 2 * 4 * 10 * 3
    assert points[0].flops == pytest.approx(per_example * points[0].d)
    assert points[0].flops / (6 * points[0].n * points[0].d) == pytest.approx(per_example / (6 * points[0].n))


def _isoflop_file(tmp_path, **changes):
    return _file(tmp_path, **{"data": [], "sizes": [{"hidden": [w]} for w in (2, 4, 8, 16, 32, 64, 128)],
                              "budgets": [3e7, 1e8, 3e8, 1e9], "sizes_per_budget": 3, **changes})


def test_isoflop_budgets_pick_sizes_around_n_c_and_train_them_on_c_over_6n(tmp_path, mlflow_uri):
    cfg, points = load_scaling(_isoflop_file(tmp_path))
    assert len(points) == 12 and {p.budget for p in points} == set(cfg.budgets)
    for c in cfg.budgets:
        ns = sorted(p.n for p in points if p.budget == c)
        assert ns[0] < (c / 6 / cfg.tokens_per_param) ** 0.5 < ns[-1]
    for p in points:  # D = C / 6N up to the rounding of the training split to whole examples
        assert 6 * p.n * p.d == pytest.approx(p.budget, rel=0.01)
    rng = np.random.default_rng(1)
    for p in points:  # alpha = beta = 1/2: N_opt = (A/B) sqrt(C/6), sqrt(C / 120) (the sizes' centre) at A/B = 20^-1/2
        p.loss = (1.0 + 15 / p.n ** 0.5 + 67 / p.d ** 0.5) * np.exp(rng.normal(0, 0.001))
    result = analyse(cfg, points)
    assert result.fits["a"].params["exponent"] == pytest.approx(0.5, abs=0.1)
    assert result.held_out["L_opt"] < 0.05 and len(result.profiles) == 4
    parent = tracking.Run.start(mlflow_uri, "scaling-test", "p", {}, {}, "")
    log_analysis(parent, cfg, points, result)
    run = MlflowClient(mlflow_uri).get_run(parent.run_id)
    assert {"a.exponent", "a.exponent_stderr", "b.exponent", "heldout_rel_error.L_opt",
            "isoflop.3.n_opt"} <= set(run.data.metrics)
    assert [a.path for a in MlflowClient(mlflow_uri).list_artifacts(parent.run_id, "scaling")] == [
        "scaling/isoflop.png"]


def test_bad_isoflop_files(tmp_path):
    with pytest.raises(UserError, match="budgets: .* at least 4 increasing"):
        load_scaling(_isoflop_file(tmp_path, budgets=[1e8, 3e7, 3e8, 1e9]))
    with pytest.raises(UserError, match="data: with budgets"):
        load_scaling(_file(tmp_path, budgets=[3e7, 1e8, 3e8, 1e9]))
    with pytest.raises(UserError, match=r"C=1e\+12 FLOPs the sizes should straddle"):
        load_scaling(_isoflop_file(tmp_path, budgets=[3e7, 1e8, 3e8, 1e12]))
    with pytest.raises(UserError, match="sizes_per_budget: 2"):
        load_scaling(_isoflop_file(tmp_path, sizes_per_budget=2))


def test_resume_needs_the_search_it_continues(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg, points = load_scaling(_file(tmp_path))
    sweep = as_sweep(cfg, points)
    assert sweep.space[POINT].values == tuple(range(15))
    trial = sweep.kind.build(sweep.trial_job({POINT: 4} | {"experiment": cfg.experiment}))[0]
    assert trial == points[4].cfg
    with pytest.raises(UserError, match="no scaling search 'scaling_mlp'"):
        check_unchanged(sweep)
    folder = sweep_dir(cfg.storage_path, cfg.name)
    folder.mkdir(parents=True)
    (folder / STATE_FILE).write_text(yaml.safe_dump(sweep_state(sweep, "p")))
    check_unchanged(sweep)
    cfg2, points2 = load_scaling(_file(tmp_path, data=[{"epochs": e} for e in (1, 2, 3)]))
    with pytest.raises(UserError, match="points differ"):
        check_unchanged(as_sweep(cfg2, points2))


def test_bad_scaling_files(tmp_path):
    with pytest.raises(UserError, match="leave 3 to fit"):
        load_scaling(_file(tmp_path, sizes=[{"hidden": [w]} for w in (4, 8, 16, 32)]))
    with pytest.raises(UserError, match="L\\(D\\) needs at least 3"):
        load_scaling(_file(tmp_path, data=[{"epochs": 1}, {"epochs": 2}]))
    with pytest.raises(UserError, match="metric: 'val_perplexity' is not valid"):
        load_scaling(_file(tmp_path, metric="val_perplexity"))
    with pytest.raises(UserError, match=r"sizes\[0\].*hidden"):
        load_scaling(_file(tmp_path, sizes=[{"hidden": "wide"}] * 5))
