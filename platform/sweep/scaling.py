"""Neural scaling laws, fitted by least squares on log-space residuals r_i = log L_hat(x_i) - log L_i.

    Kaplan et al. (2020):      L(N) = (N_c / N)^alpha_N          L(D) = (D_c / D)^alpha_D
      with an irreducible loss: L(x) = E + (x_c / x)^alpha
    Hoffmann et al. (2022):    L(N, D) = E + A / N^alpha + B / D^beta

N counts non-embedding parameters, D training tokens, and compute C ~ 6 N D FLOPs. Minimising the
Chinchilla law under C = 6 N D gives the compute-optimal allocation

    N_opt(C) = G (C / 6)^(beta / (alpha + beta)),   D_opt(C) = (C / 6) / N_opt,
    G = (alpha A / (beta B))^(1 / (alpha + beta)).

IsoFLOP profiles (Hoffmann et al. 2022, approach 2): at a fixed budget C each model size N trains on
D = C / (6 N); the loss against x = log N is fitted by the parabola L(x) = p0 + p1 x + p2 x^2, whose
minimum x* = -p1 / (2 p2) gives N_opt(C) = e^x* and D_opt(C) = C / (6 N_opt). Across budgets,

    N_opt = G_N C^a,   D_opt = G_D C^b      (a + b = 1 by construction),

fitted as straight lines in log-log space.

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


def _allocation(p: dict[str, float], c: np.ndarray) -> np.ndarray:
    return p["G"] * c ** p["exponent"]


def _chinchilla(p: dict[str, float], n: np.ndarray, d: np.ndarray) -> np.ndarray:
    return p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"]


LAWS: dict[str, Callable[..., np.ndarray]] = {"power": _power, "chinchilla": _chinchilla,
                                              "allocation": _allocation}


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


@dataclass
class IsoFLOP:
    """One budget's profile: L(log N) = p0 + p1 log N + p2 log^2 N and its minimum (N_opt, L_opt)."""

    compute: float
    coefficients: tuple[float, float, float]
    n_opt: float
    loss_opt: float

    @property
    def d_opt(self) -> float:
        return self.compute / 6 / self.n_opt

    def predict(self, n: np.ndarray) -> np.ndarray:
        x = np.log(np.asarray(n, dtype=float))
        p0, p1, p2 = self.coefficients
        return p0 + p1 * x + p2 * x ** 2


def isoflop_profile(compute: float, n: np.ndarray, loss: np.ndarray) -> IsoFLOP:
    """The parabola of `loss` against log `n` at one budget, and its minimum; a profile that bends down
    (no minimum) or has its minimum outside the sizes trained says the budget's sizes missed N_opt."""
    n, loss = np.asarray(n, dtype=float), np.asarray(loss, dtype=float)
    _check("isoflop_profile", n, loss)
    if len(n) < 3:
        raise UserError(f"isoflop_profile: a parabola needs at least 3 sizes at C={compute:.3g}, got {len(n)}.")
    p2, p1, p0 = np.polyfit(np.log(n), loss, 2)
    if p2 <= 0:
        raise UserError(f"isoflop_profile: at C={compute:.3g} the loss does not bend up against log N "
                        f"(curvature {p2:.3g}), so it has no minimum among N={n.min():.3g}..{n.max():.3g}.")
    x_opt = -p1 / (2 * p2)
    if not np.log(n.min()) <= x_opt <= np.log(n.max()):
        raise UserError(f"isoflop_profile: at C={compute:.3g} the fitted minimum N={np.exp(x_opt):.3g} lies "
                        f"outside the sizes trained (N={n.min():.3g}..{n.max():.3g}); pick sizes around it.")
    return IsoFLOP(float(compute), (float(p0), float(p1), float(p2)), float(np.exp(x_opt)),
                   float(p0 + p1 * x_opt + p2 * x_opt ** 2))


def fit_exponent(compute: np.ndarray, y: np.ndarray) -> Fit:
    """y = G C^exponent, a straight line through log C and log y."""
    compute, y = np.asarray(compute, dtype=float), np.asarray(y, dtype=float)
    _check("fit_exponent", compute, y)
    if len(compute) < 3:
        raise UserError(f"fit_exponent: 2 constants need at least 3 budgets, got {len(compute)}.")

    def to_params(u: np.ndarray) -> dict[str, float]:
        return {"G": float(np.exp(u[0])), "exponent": float(u[1])}

    def residual(u: np.ndarray) -> np.ndarray:
        return np.log(_allocation(to_params(u), compute)) - np.log(y)

    slope, icpt = np.polyfit(np.log(compute), np.log(y), 1)
    return _solve(residual, [np.array([icpt, slope])], len(compute), ["G", "exponent"], to_params, {"G"},
                  "allocation")


def fit_allocation(profiles: list[IsoFLOP]) -> dict[str, Fit]:
    """N_opt proportional to C^a ("a") and D_opt proportional to C^b ("b") across the budgets' profiles."""
    c = np.array([p.compute for p in profiles])
    return {"a": fit_exponent(c, np.array([p.n_opt for p in profiles])),
            "b": fit_exponent(c, np.array([p.d_opt for p in profiles]))}
