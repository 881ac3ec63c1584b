"""Linear-Gaussian state-space model: the Kalman filter and the Rauch-Tung-Striebel smoother.

    state        x_t = A x_{t-1} + B u_t + w_t,   w_t ~ N(0, Q)
    observation  y_t = C x_t     + D u_t + v_t,   v_t ~ N(0, R)

Predict:   x̂_{t|t-1} = A x̂_{t-1|t-1} + B u_t,       P_{t|t-1} = A P_{t-1|t-1} A^T + Q
Innovate:  ŷ_{t|t-1} = C x̂_{t|t-1} + D u_t,          F_t = C P_{t|t-1} C^T + R,   v_t = y_t - ŷ_{t|t-1}
Update:    K_t = P_{t|t-1} C^T F_t^{-1},   x̂_{t|t} = x̂_{t|t-1} + K_t v_t,   P_{t|t} = P_{t|t-1} - K_t C P_{t|t-1}
Log-lik:   log p(y_t | y_{1:t-1}) = -1/2 (p log 2π + log|F_t| + v_t^T F_t^{-1} v_t)

A missing observation (any NaN in y_t) skips the update: x̂_{t|t} = x̂_{t|t-1}, P_{t|t} = P_{t|t-1}.
The first state starts from the approximate diffuse prior x̂_{1|0} = 0, P_{1|0} = κ I (statsmodels'
default for unobserved-components models, κ = 10^6); the first `burn` log-likelihood terms, which
mostly measure κ, are left out of the likelihood, as statsmodels does (burn = state dimension).

RTS smoother, backwards from x̂_{T|T}:
    J_t = P_{t|t} A^T P_{t+1|t}^{-1},   x̂_{t|T} = x̂_{t|t} + J_t (x̂_{t+1|T} - x̂_{t+1|t}),
    P_{t|T} = P_{t|t} + J_t (P_{t+1|T} - P_{t+1|t}) J_t^T

Every function is batched over N series: y is (N, T, p), states (N, T, m), covariances (N, T, m, m).
P, F and K do not depend on the values of y, only on which y_t are missing: when every series has the
same missing pattern (and they share A, C, Q, R, P_{1|0}), the covariance recursion runs once and is
broadcast over the batch, and only the means are computed per series.
`KalmanModel` fits A, C, Q, R by maximum likelihood (Q = L L^T with a log-diagonal Cholesky factor L,
so it stays positive definite), or keeps any of them fixed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, get_args

import torch
from torch import nn

from raycraft.errors import UserError, invalid_choice
from raycraft.registry import field_doc, register_model

Matrix = Literal["A", "C", "Q", "R"]
MATRICES = get_args(Matrix)


class Band(NamedTuple):
    """An estimate through time for the plots: its mean and standard deviation at the steps t."""

    t: torch.Tensor
    mean: torch.Tensor
    sd: torch.Tensor


@dataclass
class KalmanResult:
    x_pred: torch.Tensor  # (N, T, m)     x̂_{t|t-1}
    P_pred: torch.Tensor  # (N, T, m, m)  P_{t|t-1}
    x_filt: torch.Tensor  # (N, T, m)     x̂_{t|t}
    P_filt: torch.Tensor  # (N, T, m, m)  P_{t|t}
    y_pred: torch.Tensor  # (N, T, p)     ŷ_{t|t-1}, the one-step forecast
    F: torch.Tensor       # (N, T, p, p)  its covariance
    loglik_terms: torch.Tensor  # (N, T)  log p(y_t | y_{1:t-1}); 0 where missing
    counted: torch.Tensor       # (N, T)  observed and past the diffuse burn-in

    @property
    def loglik(self) -> torch.Tensor:  # (N,)
        return (self.loglik_terms * self.counted).sum(-1)

    def forecast_interval(self, z: float = 1.96) -> tuple[torch.Tensor, torch.Tensor]:
        """Pointwise bands ŷ ± z sqrt(diag F) of the one-step forecasts, each (N, T, p)."""
        sd = torch.diagonal(self.F, dim1=-2, dim2=-1).sqrt()
        return self.y_pred - z * sd, self.y_pred + z * sd


def _matrix(name: str, value) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float64)
    if t.ndim != 2:
        raise UserError(f"{name}: expected a matrix (a list of rows), got shape {tuple(t.shape)}.")
    return t


def check_system(A=None, C=None, Q=None, R=None, B=None, D=None) -> None:
    """UserError unless the given matrices form a system: A square (m, m), C (p, m), Q (m, m) and
    R (p, p) symmetric positive definite, B (m, k) and D (p, k)."""
    mats = {k: _matrix(k, v) for k, v in dict(A=A, C=C, Q=Q, R=R, B=B, D=D).items() if v is not None}
    if "A" in mats and mats["A"].shape[0] != mats["A"].shape[1]:
        raise UserError(f"A: the transition matrix must be square (m, m), got {tuple(mats['A'].shape)}.")
    m = mats["A"].shape[0] if "A" in mats else None
    p = None
    # (matrix, axis, which dimension it fixes): each dimension is read from the first matrix that has it
    for name, axis, dim in (("Q", 0, "m"), ("Q", 1, "m"), ("C", 1, "m"), ("B", 0, "m"),
                            ("C", 0, "p"), ("R", 0, "p"), ("R", 1, "p"), ("D", 0, "p")):
        if name not in mats:
            continue
        size = mats[name].shape[axis]
        want = m if dim == "m" else p
        if want is None:
            m, p = (size, p) if dim == "m" else (m, size)
        elif size != want:
            what = "state dimension m" if dim == "m" else "observation dimension p"
            raise UserError(f"{name}: shape {tuple(mats[name].shape)} does not chain with the others' "
                            f"{what} = {want} (A: (m, m), C: (p, m), Q: (m, m), R: (p, p), B: (m, k), D: (p, k)).")
    if "B" in mats and "D" in mats and mats["B"].shape[1] != mats["D"].shape[1]:
        raise UserError(f"B, D: input dimensions differ ({mats['B'].shape[1]} vs {mats['D'].shape[1]}).")
    for name in ("Q", "R"):
        if name in mats:
            cov = mats[name]
            if not torch.allclose(cov, cov.T):
                raise UserError(f"{name}: a covariance must be symmetric, got {cov.tolist()}.")
            if torch.linalg.cholesky_ex(cov).info != 0:
                raise UserError(f"{name}: covariance {cov.tolist()} is not positive definite "
                                f"(eigenvalues {torch.linalg.eigvalsh(cov).tolist()}).")


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for small matrices in large batches, as a broadcast product-sum: one vectorised kernel over
    all series, where batched matmul calls a tiny GEMM per series (several times slower here)."""
    return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)


def mv(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """a @ x for a batch of vectors x (..., k), as `mm` does it."""
    return (a * x.unsqueeze(-2)).sum(-1)


def _gain(F: torch.Tensor, CP: torch.Tensor) -> torch.Tensor:
    """K = P C^T F^{-1} (..., m, p); a scalar F (one observed series, the common case) is divided
    elementwise, which is much faster than batched Cholesky solves."""
    if F.shape[-1] == 1:
        return CP.transpose(-1, -2) / F
    return torch.cholesky_solve(CP, torch.linalg.cholesky(F)).transpose(-1, -2)


def _gaussian_loglik(v: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """-1/2 (p log 2π + log|F| + v^T F^{-1} v) for innovations v (..., p) and covariances F (..., p, p)."""
    p = v.shape[-1]
    if p == 1:
        logdet_F, mahalanobis = torch.log(F[..., 0, 0]), v[..., 0] ** 2 / F[..., 0, 0]
    else:
        L_F = torch.linalg.cholesky(F)
        logdet_F = 2 * torch.log(torch.diagonal(L_F, dim1=-2, dim2=-1)).sum(-1)
        mahalanobis = torch.linalg.solve_triangular(L_F, v.unsqueeze(-1), upper=False).squeeze(-1).pow(2).sum(-1)
    return -0.5 * (p * math.log(2 * math.pi) + logdet_F + mahalanobis)


@dataclass
class Covariances:
    """The covariance recursion, one entry per step t (each (m, m), or (N, m, m) when the series' missing
    patterns differ): P_{t|t-1}, P_{t|t}, F_t, K_t and I - K_t C (the matrix the means are updated with)."""

    P_pred: list[torch.Tensor] = field(default_factory=list)
    P_filt: list[torch.Tensor] = field(default_factory=list)
    F: list[torch.Tensor] = field(default_factory=list)
    K: list[torch.Tensor] = field(default_factory=list)
    I_KC: list[torch.Tensor] = field(default_factory=list)


def predict_covariance(P: torch.Tensor, A: torch.Tensor, Q: torch.Tensor, matmul: Callable) -> torch.Tensor:
    """P_{t|t-1} = A P_{t-1|t-1} A^T + Q."""
    return matmul(matmul(A, P), A.T) + Q


def update_covariance(P: torch.Tensor, C: torch.Tensor, R: torch.Tensor, seen: torch.Tensor, matmul: Callable
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(F_t, K_t, P_{t|t}) from P = P_{t|t-1}:  F_t = C P C^T + R,  K_t = P C^T F_t^{-1} times `seen`
    (1, or 0 where y_t is missing: no update),  P_{t|t} = P - K_t C P, symmetrised against round-off."""
    CP = matmul(C, P)
    F = matmul(CP, C.T) + R
    K = _gain(F, CP) * seen
    P_upd = P - matmul(K, CP)
    return F, K, 0.5 * (P_upd + P_upd.transpose(-1, -2))


def covariance_pass(P: torch.Tensor, A: torch.Tensor, C: torch.Tensor, Q: torch.Tensor, R: torch.Tensor,
                    seen: list[torch.Tensor], matmul: Callable) -> Covariances:
    """Predict and update the covariances from P = P_{1|0} for each step's `seen` flag. They depend on which
    y_t are observed, not on their values, so one recursion serves every series with the same pattern."""
    out, I = Covariances(), torch.eye(A.shape[-1], dtype=P.dtype)
    for t, seen_t in enumerate(seen):
        if t > 0:
            P = predict_covariance(P, A, Q, matmul)
        F, K, P_filt = update_covariance(P, C, R, seen_t, matmul)
        for seq, value in ((out.P_pred, P), (out.F, F), (out.K, K), (out.I_KC, I - matmul(K, C)),
                           (out.P_filt, P_filt)):
            seq.append(value)
        P = P_filt
    return out


def mean_pass(x: torch.Tensor, A: torch.Tensor, K_y: list[torch.Tensor], Bu: list[torch.Tensor] | None,
              cov: Covariances, shared: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂_{t|t-1}, x̂_{t|t}), each (N, T, m), from the means x = x̂_{1|0} (N, m):

        predict  x̂_{t|t-1} = A x̂_{t-1|t-1} + B u_t
        update   x̂_{t|t}   = x̂_{t|t-1} + K_t (y_t - C x̂_{t|t-1} - D u_t) = (I - K_t C) x̂_{t|t-1} + K_t (y_t - D u_t)

    with K_y[t] = K_t (y_t - D u_t) and Bu[t] = B u_t (N, m) computed for all t at once. With `shared`
    covariances the update is one matrix product over the batch, x (I - K_t C)^T."""
    A_T = A.T
    I_KC_T = torch.stack(cov.I_KC).transpose(-1, -2).unbind(0) if shared else None
    x_pred, x_filt = [], []
    for t in range(len(K_y)):
        if t > 0:
            x = x @ A_T if Bu is None else torch.addmm(Bu[t], x, A_T)
        x_pred.append(x)
        x = torch.addmm(K_y[t], x, I_KC_T[t]) if shared else mv(cov.I_KC[t], x) + K_y[t]
        x_filt.append(x)
    return torch.stack(x_pred, 1), torch.stack(x_filt, 1)


def _per_series(seq: list[torch.Tensor], N: int, shared: bool) -> torch.Tensor:
    """T x ([N,] ...) -> (N, T, ...): a shared covariance is broadcast over the batch, not copied."""
    return torch.stack(seq).expand(N, len(seq), *seq[0].shape) if shared else torch.stack(seq, 1)


def kalman_filter(y: torch.Tensor, A: torch.Tensor, C: torch.Tensor, Q: torch.Tensor, R: torch.Tensor, *,
                  B: torch.Tensor | None = None, D: torch.Tensor | None = None, u: torch.Tensor | None = None,
                  x0: torch.Tensor | None = None, P0: torch.Tensor | None = None, kappa: float = 1e6,
                  burn: int | None = None) -> KalmanResult:
    """Filter N series y (N, T, p), NaN where missing, with inputs u (N, T, k) if B or D is given.

    x0 (m,) and P0 (m, m) are the prior x̂_{1|0}, P_{1|0}; by default the approximate diffuse 0 and κ I.
    `burn` log-likelihood terms are left out (default m, statsmodels' rule for the diffuse prior).
    Three passes: the covariances (P, F, K), then the means, then every log-likelihood term at once."""
    N, T, p = y.shape
    m = A.shape[-1]
    observed = ~torch.isnan(y).any(-1)  # (N, T)
    y0 = torch.nan_to_num(y)
    shared = bool((observed == observed[:1]).all())  # one missing pattern: P, F and K are the same for all
    P = kappa * torch.eye(m, dtype=y.dtype) if P0 is None else P0
    seen = observed[0] if shared else observed.T[..., None, None]  # T x () or T x (N, 1, 1): 1 seen, 0 missing
    cov = covariance_pass(P if shared else P.expand(N, m, m), A, C, Q, R, seen.to(y.dtype).unbind(0),
                          torch.matmul if shared else mm)

    y_free = y0 if D is None else y0 - mv(D, u)                                      # y_t - D u_t (N, T, p)
    K_y = mv(torch.stack(cov.K).reshape(T, -1, m, p), y_free.transpose(0, 1)).unbind(0)  # T x (N, m)
    Bu = None if B is None else mv(B, u.transpose(0, 1)).unbind(0)                     # T x (N, m)
    x = (torch.zeros(m, dtype=y.dtype) if x0 is None else x0).expand(N, m)
    x_pred, x_filt = mean_pass(x, A, K_y, Bu, cov, shared)

    F = _per_series(cov.F, N, shared)
    y_pred = mv(C, x_pred) if D is None else mv(C, x_pred) + mv(D, u)               # ŷ_{t|t-1} (N, T, p)
    ll = _gaussian_loglik(y0 - y_pred, F)
    counted = observed & (torch.arange(T) >= (m if burn is None else burn))
    return KalmanResult(x_pred, _per_series(cov.P_pred, N, shared), x_filt, _per_series(cov.P_filt, N, shared),
                        y_pred, F, torch.where(observed, ll, torch.zeros_like(ll)), counted)


def rts_smoother(result: KalmanResult, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Smoothed means x̂_{t|T} (N, T, m) and covariances P_{t|T} (N, T, m, m) from a filter's output."""
    x_s, P_s = [result.x_filt[:, -1]], [result.P_filt[:, -1]]
    for t in range(result.x_filt.shape[1] - 2, -1, -1):
        P_f, P_p = result.P_filt[:, t], result.P_pred[:, t + 1]
        J = torch.linalg.solve(P_p, A @ P_f).transpose(-1, -2)   # P_{t|t} A^T P_{t+1|t}^{-1}
        x_s.append(result.x_filt[:, t] + (J @ (x_s[-1] - result.x_pred[:, t + 1]).unsqueeze(-1)).squeeze(-1))
        P_s.append(P_f + J @ (P_s[-1] - P_p) @ J.transpose(-1, -2))
    return torch.stack(x_s[::-1], 1), torch.stack(P_s[::-1], 1)


def forecast(result: KalmanResult, A: torch.Tensor, C: torch.Tensor, Q: torch.Tensor, R: torch.Tensor,
             steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """h = 1..steps ahead of the last observation, without inputs: means C A^h x̂_{T|T} (N, steps, p) and
    covariances C P_{T+h|T} C^T + R (N, steps, p, p)."""
    x, P = result.x_filt[:, -1], result.P_filt[:, -1]
    means, covs = [], []
    for _ in range(steps):
        x, P = x @ A.T, A @ P @ A.T + Q
        means.append(x @ C.T)
        covs.append(C @ P @ C.T + R)
    return torch.stack(means, 1), torch.stack(covs, 1)


@dataclass
class KalmanConfig:
    state_dim: int = field_doc(1, "State dimension m when A is not given (A then starts as the identity).")
    A: list[list[float]] | None = field_doc(None, "Transition matrix (m, m); default identity (random walk).")
    C: list[list[float]] | None = field_doc(None, "Observation matrix (p, m); default: each series reads state 0.")
    Q: list[list[float]] | None = field_doc(None, "State noise covariance (m, m); default: half the variance of "
                                                  "the series' differences on the diagonal.")
    R: list[list[float]] | None = field_doc(None, "Observation noise covariance (p, p); default as Q.")
    fit: tuple[Matrix, ...] = field_doc(("Q", "R"), "Matrices fitted by maximum likelihood; the others stay fixed.")
    kappa: float = field_doc(1e6, "Variance of the approximate diffuse prior P_{1|0} = kappa I.")
    burn: int | None = field_doc(None, "Log-likelihood terms left out at the start (default: state dimension).",
                                 minimum=0)

    def __post_init__(self) -> None:
        for name in self.fit:
            if name not in MATRICES:
                raise invalid_choice("kalman.fit", name, MATRICES)
        check_system(self.A, self.C, self.Q, self.R)
        if self.A is not None and len(self.A) != self.state_dim:
            self.state_dim = len(self.A)
        if self.kappa <= 0:
            raise UserError(f"kalman.kappa: {self.kappa} must be > 0.")


class CovarianceParam(nn.Module):
    """Σ = L L^T with L lower triangular and diag(L) = exp(log_diag): positive definite for any value."""

    def __init__(self, cov: torch.Tensor, trainable: bool) -> None:
        super().__init__()
        L = torch.linalg.cholesky(cov)
        self.log_diag = nn.Parameter(torch.log(torch.diagonal(L)).clone(), requires_grad=trainable)
        self.lower = nn.Parameter(torch.tril(L, -1).clone(), requires_grad=trainable)

    def forward(self) -> torch.Tensor:
        L = torch.tril(self.lower, -1) + torch.diag(torch.exp(self.log_diag))
        return L @ L.T


class KalmanModel(nn.Module):
    """forward(y (N, T, p)) -> (log p(y_t | y_{1:t-1}) (N, T), counted (N, T)): `log_likelihood_terms`."""

    def __init__(self, cfg: KalmanConfig, obs_dim: int, scale: float = 1.0) -> None:
        super().__init__()
        m, p = cfg.state_dim, obs_dim
        A = _matrix("A", cfg.A) if cfg.A is not None else torch.eye(m, dtype=torch.float64)
        if cfg.C is not None:
            C = _matrix("C", cfg.C)
        else:
            C = torch.zeros(p, m, dtype=torch.float64)
            C[:, 0] = 1.0
        Q = _matrix("Q", cfg.Q) if cfg.Q is not None else scale * torch.eye(m, dtype=torch.float64)
        R = _matrix("R", cfg.R) if cfg.R is not None else scale * torch.eye(p, dtype=torch.float64)
        check_system(A, C, Q, R)
        if C.shape[0] != p:
            raise UserError(f"C: {tuple(C.shape)} has {C.shape[0]} rows, but the data has {p} series columns.")
        self.A = nn.Parameter(A, requires_grad="A" in cfg.fit)
        self.C = nn.Parameter(C, requires_grad="C" in cfg.fit)
        self.Q = CovarianceParam(Q, "Q" in cfg.fit)
        self.R = CovarianceParam(R, "R" in cfg.fit)
        self.kappa, self.burn = cfg.kappa, cfg.burn

    def filter(self, y: torch.Tensor) -> KalmanResult:
        return kalman_filter(y.double(), self.A, self.C, self.Q(), self.R(), kappa=self.kappa, burn=self.burn)

    def log_likelihood_terms(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The prediction-error decomposition of the likelihood, one term per step (N, T), and which
        terms count (N, T): observed and past the diffuse burn-in,

            log p(y_{1:T}) = Σ_t log p(y_t | y_{1:t-1}) = Σ_t -1/2 (p log 2π + log|F_t| + v_t^T F_t^{-1} v_t),

        v_t = y_t - ŷ_{t|t-1} the innovation and F_t its covariance, both from the filter."""
        res = self.filter(y)
        return res.loglik_terms, res.counted

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.log_likelihood_terms(y)

    def param_metrics(self) -> dict[str, torch.Tensor]:
        """The fitted variances (diagonals of Q and R), logged as metrics each epoch."""
        Q, R = self.Q().detach(), self.R().detach()
        return {**{f"var_state_{i}": Q[i, i] for i in range(len(Q))},
                **{f"var_obs_{i}": R[i, i] for i in range(len(R))}}

    @torch.no_grad()
    def estimates(self, y: torch.Tensor, horizon: int) -> dict[str, Band]:
        """What the filter and smoother say about the first series' first column, each a band (t, mean, sd):

            filtered   C x̂_{t|t} ± sqrt(C P_{t|t} C^T)        smoothed   C x̂_{t|T} ± sqrt(C P_{t|T} C^T)
            one_step   ŷ_{t|t-1} ± sqrt(F_t)                   ahead      C A^h x̂_{T|T} ± sqrt(C P_{T+h|T} C^T + R)

        for t = 1..T, and h = 1..horizon past the last observation."""
        res = self.filter(y[:1])
        x_s, P_s = rts_smoother(res, self.A)
        f_mean, f_cov = forecast(res, self.A, self.C, self.Q(), self.R(), horizon)
        T = y.shape[1]
        t = torch.arange(T)

        def observed(x: torch.Tensor, P: torch.Tensor) -> Band:  # C x and sqrt(C P C^T)
            return Band(t, (x[0] @ self.C.T)[:, 0], (self.C @ P[0] @ self.C.T)[:, 0, 0].sqrt())

        return {"filtered": observed(res.x_filt, res.P_filt), "smoothed": observed(x_s, P_s),
                "one_step": Band(t, res.y_pred[0, :, 0], res.F[0, :, 0, 0].sqrt()),
                "ahead": Band(torch.arange(T, T + horizon), f_mean[0, :, 0], f_cov[0, :, 0, 0].sqrt())}


@register_model("kalman", family="state-space", config=KalmanConfig, task="time-series",
                recipe={"epochs": 100, "batch_size": 256, "optim": {"name": "adam", "lr": 0.05}})
def kalman(cfg: KalmanConfig, data_info: dict) -> KalmanModel:
    """Kalman filter + RTS smoother; A, C, Q, R fitted by maximum likelihood or fixed."""
    return KalmanModel(cfg, int(data_info.get("obs_dim", 1)), float(data_info.get("diff_var", 1.0)) / 2)
