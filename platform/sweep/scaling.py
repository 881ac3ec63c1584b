"""Neural scaling laws, fitted by least squares on log-space residuals r_i = log L_hat(x_i) - log L_i.

    Kaplan et al. (2020):      L(N) = (N_c / N)^alpha_N          L(D) = (D_c / D)^alpha_D
      with an irreducible loss: L(x) = E + (x_c / x)^alpha
    Hoffmann et al. (2022):    L(N, D) = E + A / N^alpha + B / D^beta

N counts non-embedding parameters, D training tokens, and compute C ~ 6 N D FLOPs. Minimising the
Chinchilla law under C = 6 N D gives the compute-optimal allocation

    N_opt(C) = G (C / 6)^(beta / (alpha + beta)),   D_opt(C) = (C / 6) / N_opt,
    G = (alpha A / (beta B))^(1 / (alpha + beta)).

Parameters are fitted in log form (log x_c, log E, log A, log B) so they stay positive; their standard
errors come from the Jacobian at the optimum, cov = s^2 (J^T J)^-1 with s^2 = SSR / (n - p), and are
carried to the constants themselves by the delta method (se(e^u) = e^u se(u)).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares

from raycraft.errors import UserError


@dataclass
class Fit:
    """Fitted constants, their standard errors, and the RMS of the log-space residuals."""

    law: str
    params: dict[str, float]
    stderr: dict[str, float]
    rmse_log: float

    def predict(self, *x: np.ndarray) -> np.ndarray:
        return LAWS[self.law](self.params, *(np.asarray(v, dtype=float) for v in x))


def _power(p: dict[str, float], x: np.ndarray) -> np.ndarray:
    return p.get("E", 0.0) + (p["x_c"] / x) ** p["alpha"]


def _chinchilla(p: dict[str, float], n: np.ndarray, d: np.ndarray) -> np.ndarray:
    return p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"]


LAWS: dict[str, Callable[..., np.ndarray]] = {"power": _power, "chinchilla": _chinchilla}


def _check(name: str, *arrays: np.ndarray) -> None:
    for a in arrays:
        if a.ndim != 1 or len(a) != len(arrays[0]) or not np.all(np.isfinite(a)) or np.any(a <= 0):
            raise UserError(f"{name}: needs positive, finite 1-D arrays of equal length.")


def _solve(residual: Callable[[np.ndarray], np.ndarray], starts: list[np.ndarray], n: int,
           names: list[str], to_params: Callable[[np.ndarray], dict[str, float]],
           logged: set[str], law: str) -> Fit:
    best = min((least_squares(residual, s, method="lm" if n > len(s) else "trf") for s in starts),
               key=lambda r: r.cost)
    dof = max(n - len(best.x), 1)
    s2 = 2 * best.cost / dof
    cov = s2 * np.linalg.pinv(best.jac.T @ best.jac)
    se_u = np.sqrt(np.clip(np.diag(cov), 0, None))
    params = to_params(best.x)
    stderr = {k: float(params[k] * se_u[i] if k in logged else se_u[i]) for i, k in enumerate(names)}
    return Fit(law, params, stderr, float(np.sqrt(np.mean(best.fun ** 2))))


def fit_power_law(x: np.ndarray, loss: np.ndarray, irreducible: bool = False) -> Fit:
    """L(x) = (x_c / x)^alpha, or E + (x_c / x)^alpha with `irreducible`."""
    x, loss = np.asarray(x, dtype=float), np.asarray(loss, dtype=float)
    _check("fit_power_law", x, loss)
    names = ["x_c", "alpha"] + (["E"] if irreducible else [])
    need = len(names) + 1
    if len(x) < need:
        raise UserError(f"fit_power_law: {len(names)} constants need at least {need} points, got {len(x)}.")

    def to_params(u: np.ndarray) -> dict[str, float]:
        p = {"x_c": float(np.exp(u[0])), "alpha": float(u[1])}
        if irreducible:
            p["E"] = float(np.exp(u[2]))
        return p

    def residual(u: np.ndarray) -> np.ndarray:
        return np.log(_power(to_params(u), x)) - np.log(loss)

    # Start from the straight line through log L = alpha log x_c - alpha log x.
    slope, icpt = np.polyfit(np.log(x), np.log(loss), 1)
    alpha0 = max(-slope, 1e-2)
    starts = [np.array([icpt / alpha0, alpha0])]
    if irreducible:
        floor = 0.5 * loss.min()
        starts = [np.array([icpt / a, a, np.log(floor * f)]) for a in (alpha0, 2 * alpha0) for f in (0.1, 0.9)]
    return _solve(residual, starts, len(x), names, to_params, {"x_c", "E"}, "power")


def fit_chinchilla(n: np.ndarray, d: np.ndarray, loss: np.ndarray) -> Fit:
    """L(N, D) = E + A / N^alpha + B / D^beta, from a grid of starting points (as Hoffmann et al.)."""
    n, d, loss = (np.asarray(v, dtype=float) for v in (n, d, loss))
    _check("fit_chinchilla", n, d, loss)
    names = ["E", "A", "B", "alpha", "beta"]
    if len(n) < 6:
        raise UserError(f"fit_chinchilla: 5 constants need at least 6 runs, got {len(n)}.")

    def to_params(u: np.ndarray) -> dict[str, float]:
        return {"E": float(np.exp(u[0])), "A": float(np.exp(u[1])), "B": float(np.exp(u[2])),
                "alpha": float(u[3]), "beta": float(u[4])}

    def residual(u: np.ndarray) -> np.ndarray:
        return np.log(_chinchilla(to_params(u), n, d)) - np.log(loss)

    starts = [np.array([np.log(e * loss.min()), a0 * np.log(n).mean(), b0 * np.log(d).mean(), a0, b0])
              for e, a0, b0 in itertools.product((0.3, 0.8), (0.2, 0.5), (0.2, 0.5))]
    return _solve(residual, starts, len(n), names, to_params, {"E", "A", "B"}, "chinchilla")


def compute_optimal(fit: Fit, compute: float) -> tuple[float, float]:
    """(N_opt, D_opt) minimising the Chinchilla law at C = 6 N D FLOPs."""
    p = fit.params
    a, b = p["alpha"], p["beta"]
    g = (a * p["A"] / (b * p["B"])) ** (1 / (a + b))
    n_opt = g * (compute / 6) ** (b / (a + b))
    return float(n_opt), float(compute / 6 / n_opt)


def held_out_error(fit: Fit, loss: np.ndarray, *x: np.ndarray) -> np.ndarray:
    """Relative error |L_hat - L| / L of a fit's predictions for runs it did not see."""
    loss = np.asarray(loss, dtype=float)
    return np.abs(fit.predict(*x) - loss) / loss
