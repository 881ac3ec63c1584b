"""The Kalman filter and RTS smoother against statsmodels, the time-series datasets, and bad systems."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raycraft.data.base import DataConfig
from raycraft.errors import UserError
from raycraft.models.kalman import KalmanConfig, KalmanModel, check_system, forecast, kalman_filter, rts_smoother
from raycraft.registry import load_dataset

sm = pytest.importorskip("statsmodels.api")

SIGMA2_EPS, SIGMA2_ETA = 15099.0, 1469.1  # Durbin & Koopman's Nile estimates


def _nile() -> np.ndarray:
    return sm.datasets.nile.load_pandas().data["volume"].to_numpy(dtype=float)


def _m(v) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64).reshape(1, 1) if np.isscalar(v) else torch.tensor(v).double()


def _local_level(y: np.ndarray):
    """statsmodels' local level at the fixed parameters; its default init is approximate diffuse (1e6)."""
    model = sm.tsa.UnobservedComponents(y, "local level")
    return model.smooth([SIGMA2_EPS, SIGMA2_ETA])


def test_loglik_filter_and_smoother_match_statsmodels_on_nile():
    y = _nile()
    ref = _local_level(y)
    res = kalman_filter(torch.tensor(y).reshape(1, -1, 1), _m(1.0), _m(1.0), _m(SIGMA2_ETA), _m(SIGMA2_EPS))
    assert res.counted[0, 0].item() is False and res.counted[0, 1:].all()  # statsmodels burns the first term
    assert res.loglik.item() == pytest.approx(ref.llf, abs=1e-6)
    np.testing.assert_allclose(res.x_filt[0, :, 0], ref.filtered_state[0], rtol=1e-9)
    np.testing.assert_allclose(res.P_filt[0, :, 0, 0], ref.filtered_state_cov[0, 0], rtol=1e-9)
    np.testing.assert_allclose(res.y_pred[0, 1:, 0], ref.forecasts[0, 1:], rtol=1e-9)
    np.testing.assert_allclose(res.F[0, 1:, 0, 0], ref.forecasts_error_cov[0, 0, 1:], rtol=1e-9)
    x_s, P_s = rts_smoother(res, _m(1.0))
    np.testing.assert_allclose(x_s[0, :, 0], ref.smoothed_state[0], rtol=1e-9)
    np.testing.assert_allclose(P_s[0, :, 0, 0], ref.smoothed_state_cov[0, 0], rtol=1e-7)
    mean, cov = forecast(res, _m(1.0), _m(1.0), _m(SIGMA2_ETA), _m(SIGMA2_EPS), 3)
    f = ref.get_forecast(3)
    np.testing.assert_allclose(mean[0, :, 0], f.predicted_mean, rtol=1e-9)
    np.testing.assert_allclose(cov[0, :, 0, 0], f.var_pred_mean, rtol=1e-9)


def test_missing_values_skip_the_update_like_statsmodels():
    y = _nile().copy()
    y[[10, 11, 40, 99]] = np.nan
    ref = _local_level(y)
    res = kalman_filter(torch.tensor(y).reshape(1, -1, 1), _m(1.0), _m(1.0), _m(SIGMA2_ETA), _m(SIGMA2_EPS))
    assert res.loglik.item() == pytest.approx(ref.llf, abs=1e-6)
    assert torch.equal(res.x_filt[0, 10], res.x_pred[0, 10])  # nothing learned from a missing value
    np.testing.assert_allclose(res.x_filt[0, :, 0], ref.filtered_state[0], rtol=1e-9)


def test_batched_series_with_inputs_and_a_two_state_system():
    """A local linear trend with an input in both equations, batched: each series equals its own filter,
    and the log-likelihood equals the Gaussian density of the whole series (the prediction-error
    decomposition), computed from the stacked state-space covariance."""
    torch.manual_seed(0)
    A, C = _m([[1.0, 1.0], [0.0, 1.0]]), _m([[1.0, 0.0]])
    Q, R = _m([[0.5, 0.1], [0.1, 0.2]]), _m([[1.0]])
    B, D = _m([[0.3], [0.0]]), _m([[0.7]])
    N, T = 3, 6
    y, u = torch.randn(N, T, 1, dtype=torch.float64), torch.randn(N, T, 1, dtype=torch.float64)
    x0, P0 = torch.zeros(2, dtype=torch.float64), 2.0 * torch.eye(2, dtype=torch.float64)
    res = kalman_filter(y, A, C, Q, R, B=B, D=D, u=u, x0=x0, P0=P0, burn=0)
    one = kalman_filter(y[1:2], A, C, Q, R, B=B, D=D, u=u[1:2], x0=x0, P0=P0, burn=0)
    assert torch.allclose(res.loglik[1], one.loglik[0])
    # y = G w + mean with w the initial state and noises: the exact joint density of y_{1:T}
    for n in range(N):
        means, states = [], [x0]
        for t in range(T):
            if t:
                states.append(A @ states[-1] + B @ u[n, t])
            means.append(C @ states[-1] + D @ u[n, t])
        # covariance of x_t: Cov(x_t, x_s) = A^{t-s} P_s for t >= s; P_t = A P_{t-1} A^T + Q
        P = [P0]
        for _ in range(1, T):
            P.append(A @ P[-1] @ A.T + Q)
        S = torch.zeros(T, T, dtype=torch.float64)
        for t in range(T):
            for s in range(t + 1):
                cov = torch.linalg.matrix_power(A, t - s) @ P[s]
                S[t, s] = S[s, t] = (C @ cov @ C.T).item()
        S += R.item() * torch.eye(T, dtype=torch.float64)
        dist = torch.distributions.MultivariateNormal(torch.cat(means).reshape(T), S)
        assert res.loglik[n].item() == pytest.approx(dist.log_prob(y[n, :, 0]).item(), abs=1e-9)


@pytest.mark.parametrize("kwargs, match", [
    ({"A": [[1.0, 0.0]]}, "must be square"),
    ({"Q": [[1.0, 2.0], [2.0, 1.0]]}, "not positive definite"),
    ({"R": [[-1.0]]}, "not positive definite"),
    ({"A": [[1.0]], "C": [[1.0, 0.0]]}, "does not chain"),
    ({"C": [[1.0]], "R": [[1.0, 0.0], [0.0, 1.0]]}, "does not chain"),
    ({"fit": ["Q", "P"]}, "kalman.fit"),
])
def test_bad_systems_are_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        KalmanConfig(**kwargs)


def test_check_system_accepts_a_consistent_system():
    """What check_system accepts, the filter runs; the same system with one shape off is refused (so the
    acceptance is not a check that passes anything)."""
    system = {"A": [[1.0, 1.0], [0.0, 1.0]], "C": [[1.0, 0.0]], "Q": [[1.0, 0.0], [0.0, 1.0]], "R": [[2.0]],
              "B": [[1.0], [0.0]], "D": [[0.0]]}
    check_system(**system)
    torch.manual_seed(0)
    y, u = torch.randn(2, 5, 1, dtype=torch.float64), torch.randn(2, 5, 1, dtype=torch.float64)
    res = kalman_filter(y, **{k: _m(v) for k, v in system.items()}, u=u)
    assert res.x_filt.shape == (2, 5, 2) and torch.isfinite(res.loglik).all()
    with pytest.raises(UserError, match="input dimensions differ"):
        check_system(**{**system, "D": [[0.0, 1.0]]})
    with pytest.raises(UserError, match="does not chain"):
        check_system(**{**system, "B": [[1.0]]})


def test_mle_by_gradient_ascent_matches_statsmodels_mle():
    """The model's own likelihood, maximised by Adam as the training loop does, finds statsmodels' MLE."""
    torch.manual_seed(0)
    splits = load_dataset("nile", DataConfig(val_fraction=0.0, test_fraction=0.0))
    y, mask = splits.train.tensors
    model = KalmanModel(KalmanConfig(), 1, splits.info["diff_var"] / 2)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(250):
        log_lik, counted = model(y)
        loss = -log_lik[counted & mask].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    fit = sm.tsa.UnobservedComponents(_nile(), "local level").fit(disp=0)
    got = model.param_metrics()
    assert got["var_obs_0"].item() == pytest.approx(fit.params[0], rel=0.03)
    assert got["var_state_0"].item() == pytest.approx(fit.params[1], rel=0.03)
    assert -loss.item() * counted.sum().item() == pytest.approx(fit.llf, abs=0.05)


def test_time_series_splits_score_the_future_given_the_past():
    s = load_dataset("nile", DataConfig(val_fraction=0.2, test_fraction=0.2))
    (y_tr, m_tr), (y_va, m_va), (y_te, m_te) = s.train.tensors, s.val.tensors, s.test.tensors
    assert y_tr.shape == (1, 80 - 16, 1) and y_va.shape == (1, 80, 1) and y_te.shape == (1, 100, 1)
    assert m_tr.all() and m_va.sum() == 16 and m_va[0, 64:].all() and m_te.sum() == 20 and m_te[0, 80:].all()
    co2 = load_dataset("co2", DataConfig())
    y = co2.test.tensors[0]
    assert y.shape == (1, 2284, 1) and int(torch.isnan(y).sum()) == 59
    assert math.isfinite(co2.info["diff_var"])


def test_csv_series_reads_your_column(tmp_path):
    (tmp_path / "sales.csv").write_text("day,units\n1,10\n2,\n3,12.5\n4,NA\n5,13\n6,14\n")
    s = load_dataset("csv_series", DataConfig(data_dir=str(tmp_path), val_fraction=0.0, test_fraction=0.0))
    y = s.train.tensors[0][0, :, 0]
    assert torch.isnan(y[[1, 3]]).all() and y[[0, 2, 4, 5]].tolist() == [10, 12.5, 13, 14]
    (tmp_path / "sales.csv").write_text("day,units\n1,10\n2,ten\n3,12\n")
    with pytest.raises(UserError, match="'ten' is not a number"):
        load_dataset("csv_series", DataConfig(data_dir=str(tmp_path)))


def test_shared_covariance_path_equals_per_series_path():
    """Series with one missing pattern share P, F, K (computed once); a batch whose patterns differ
    computes them per series. Both give each series exactly its own filter."""
    torch.manual_seed(1)
    A, C, Q, R = _m([[0.9, 0.2], [0.0, 1.0]]), _m([[1.0, 0.5]]), _m([[0.3, 0.0], [0.0, 0.1]]), _m([[2.0]])
    y = torch.randn(4, 12, 1, dtype=torch.float64)
    shared = kalman_filter(y, A, C, Q, R)
    y_gap = y.clone()
    y_gap[2, 5] = float("nan")
    mixed = kalman_filter(y_gap, A, C, Q, R)
    for n in range(4):
        alone = kalman_filter(y_gap[n:n + 1], A, C, Q, R)
        for field in ("x_filt", "P_filt", "F", "loglik_terms"):
            assert torch.allclose(getattr(mixed, field)[n], getattr(alone, field)[0], rtol=1e-12, atol=0)
        if n != 2:
            assert torch.allclose(shared.x_filt[n], alone.x_filt[0], rtol=1e-12, atol=0)
    assert shared.P_filt.shape == (4, 12, 2, 2) and not torch.equal(mixed.P_filt[2], mixed.P_filt[0])


def test_estimates_are_filter_smoother_and_forecast_seen_through_C():
    """The bands the plots draw: statsmodels' filtered and smoothed states, one-step forecasts and the forecast
    beyond the last observation, each with its standard deviation."""
    ref = _local_level(_nile())
    model = KalmanModel(KalmanConfig(Q=[[SIGMA2_ETA]], R=[[SIGMA2_EPS]], fit=()), 1)
    est = model.estimates(torch.tensor(_nile()).reshape(1, -1, 1), 3)
    np.testing.assert_allclose(est["filtered"].mean, ref.filtered_state[0], rtol=1e-9)
    np.testing.assert_allclose(est["filtered"].sd ** 2, ref.filtered_state_cov[0, 0], rtol=1e-9)
    np.testing.assert_allclose(est["smoothed"].mean, ref.smoothed_state[0], rtol=1e-9)
    np.testing.assert_allclose(est["smoothed"].sd ** 2, ref.smoothed_state_cov[0, 0], rtol=1e-7)
    np.testing.assert_allclose(est["one_step"].mean[1:], ref.forecasts[0, 1:], rtol=1e-9)
    np.testing.assert_allclose(est["one_step"].sd[1:] ** 2, ref.forecasts_error_cov[0, 0, 1:], rtol=1e-9)
    f = ref.get_forecast(3)
    assert est["ahead"].t.tolist() == [100, 101, 102] and est["filtered"].t.tolist() == list(range(100))
    np.testing.assert_allclose(est["ahead"].mean, f.predicted_mean, rtol=1e-9)
    np.testing.assert_allclose(est["ahead"].sd ** 2, f.var_pred_mean, rtol=1e-9)
