"""Scaling-law fits recover the constants of a known law from noisy synthetic losses."""

from __future__ import annotations

import numpy as np
import pytest

from raycraft.errors import UserError
from raycraft.sweep.scaling import (
    compute_optimal,
    fit_allocation,
    fit_chinchilla,
    fit_power_law,
    held_out_error,
    isoflop_profile,
)


def _noisy(loss: np.ndarray, seed: int, sigma: float = 0.01) -> np.ndarray:
    return loss * np.exp(np.random.default_rng(seed).normal(0, sigma, loss.shape))


def test_power_law_recovers_kaplan_exponent_within_5_percent():
    n = np.logspace(5, 9, 12)
    loss = _noisy((8.8e13 / n) ** 0.076, seed=0, sigma=0.005)
    fit = fit_power_law(n, loss)
    assert fit.params["alpha"] == pytest.approx(0.076, rel=0.05)
    assert np.log(fit.params["x_c"]) == pytest.approx(np.log(8.8e13), rel=0.05)
    assert 0 < fit.stderr["alpha"] < 0.01 and fit.rmse_log < 0.01


def test_power_law_with_irreducible_loss():
    d = np.logspace(6, 10, 16)
    loss = _noisy(1.7 + (5.4e7 / d) ** 0.3, seed=1, sigma=0.003)
    fit = fit_power_law(d, loss, irreducible=True)
    assert fit.params["alpha"] == pytest.approx(0.3, rel=0.05)
    assert fit.params["E"] == pytest.approx(1.7, rel=0.05)
    # without the floor the law cannot bend: worse residuals
    assert fit_power_law(d, loss).rmse_log > 3 * fit.rmse_log


def test_chinchilla_recovers_exponents_and_predicts_held_out_runs():
    true = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
    n, d = (g.ravel() for g in np.meshgrid(np.logspace(6, 9, 6), np.logspace(8, 11, 6)))
    loss = _noisy(true["E"] + true["A"] / n ** true["alpha"] + true["B"] / d ** true["beta"], seed=2)
    small = n < n.max()
    fit = fit_chinchilla(n[small], d[small], loss[small])
    for k in ("alpha", "beta", "E"):
        assert fit.params[k] == pytest.approx(true[k], rel=0.05), k
    assert held_out_error(fit, loss[~small], n[~small], d[~small]).max() < 0.03
    # compute-optimal allocation: C = 6 N D, and no other split of C along the law does better
    c = 1e21
    n_opt, d_opt = compute_optimal(fit, c)
    assert 6 * n_opt * d_opt == pytest.approx(c)
    others = np.array([0.5, 2.0]) * n_opt
    assert np.all(fit.predict(others, c / 6 / others) > fit.predict([n_opt], [d_opt]))


def test_too_few_points_or_bad_values_are_user_errors():
    with pytest.raises(UserError, match="at least 3 points"):
        fit_power_law(np.array([1.0, 2.0]), np.array([1.0, 0.5]))
    with pytest.raises(UserError, match="positive"):
        fit_power_law(np.array([1.0, 2.0, 3.0]), np.array([1.0, -0.5, 0.2]))


def test_isoflop_profiles_recover_the_allocation_exponents_within_5_percent():
    """On L(N, D) = E + A/N^alpha + B/D^beta with D = C / 6N the optimum is N_opt ~ C^(beta/(alpha+beta)) and
    D_opt ~ C^(alpha/(alpha+beta)) (Hoffmann et al. 2022, eq. 4): the profiles must give both back."""
    alpha, beta = 0.34, 0.28
    budgets = np.logspace(17, 21, 5)
    profiles = []
    for i, c in enumerate(budgets):
        n_star = (alpha * 406.4 / (beta * 410.7)) ** (1 / (alpha + beta)) * (c / 6) ** (beta / (alpha + beta))
        n = n_star * np.geomspace(0.25, 4, 7)
        loss = _noisy(1.69 + 406.4 / n ** alpha + 410.7 / (c / 6 / n) ** beta, seed=10 + i, sigma=0.001)
        profile = isoflop_profile(c, n, loss)
        assert profile.d_opt == pytest.approx(c / 6 / profile.n_opt)
        assert np.all(profile.predict(n[[0, -1]]) > profile.loss_opt)
        profiles.append(profile)
    fits = fit_allocation(profiles)
    assert fits["a"].params["exponent"] == pytest.approx(beta / (alpha + beta), rel=0.05)
    assert fits["b"].params["exponent"] == pytest.approx(alpha / (alpha + beta), rel=0.05)
    assert fits["a"].params["exponent"] + fits["b"].params["exponent"] == pytest.approx(1.0)
    assert 0 < fits["a"].stderr["exponent"] < 0.05


def test_a_profile_without_a_minimum_among_its_sizes_is_refused():
    n = np.geomspace(1e6, 1e7, 5)
    with pytest.raises(UserError, match="does not bend up"):
        isoflop_profile(1e18, n, 3.0 - 0.1 * np.log(n) ** 2 / 100)
    with pytest.raises(UserError, match="outside the sizes trained"):
        isoflop_profile(1e18, n, 2.0 + 0.01 * (np.log(n) - np.log(3e7)) ** 2)
