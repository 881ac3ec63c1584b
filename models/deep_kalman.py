"""Deep Kalman filter (Krishnan, Shalit & Sontag 2015): a state-space model with neural dynamics,

    z_1 ~ N(0, I),   z_t ~ N(G(z_{t-1}), diag S(z_{t-1})),   y_t ~ N(F(z_t), diag σ_y²)

G(z) = z + MLP(z) (the transition), S(z) = softplus(MLP(z)), F an MLP (the emission). An inference network
q(z_t | z_{t-1}, y_{t:T}) reads the sequence backwards with a GRU (the "ST-R" structured posterior) and
combines its state h_t with z_{t-1}:  h = (tanh(W z_{t-1} + b) + h_t) / 2,  μ_t = W_μ h,  σ_t = softplus(W_σ h).
Training maximises the ELBO, one reparameterised sample z_t = μ_t + σ_t ε per step:

    ELBO = Σ_t E_q[ log N(y_t; F(z_t), σ_y²) ] - KL( q(z_t | z_{t-1}, y_{t:T}) || p(z_t | z_{t-1}) )

Missing observations (NaN) enter the GRU as zeros with a missing flag and drop out of the likelihood.
Series are standardised with the training split's mean and standard deviation inside the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from raycraft.models.kalman import Band
from raycraft.registry import field_doc, register_model


@dataclass
class DeepKalmanConfig:
    latent_dim: int = field_doc(2, "Dimension of the latent state z_t.")
    hidden: int = field_doc(32, "Width of the transition, emission and inference networks.")


def mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


def gaussian_kl(mu_q: torch.Tensor, var_q: torch.Tensor, mu_p: torch.Tensor, var_p: torch.Tensor) -> torch.Tensor:
    """KL(N(mu_q, diag var_q) || N(mu_p, diag var_p)), summed over the last axis."""
    return 0.5 * (torch.log(var_p / var_q) + (var_q + (mu_q - mu_p) ** 2) / var_p - 1).sum(-1)


class DeepKalmanFilter(nn.Module):
    """forward(y (N, T, p)) -> (ELBO per step (N, T): `elbo_terms`' log-likelihood minus KL, counted (N, T))."""

    def __init__(self, cfg: DeepKalmanConfig, obs_dim: int, mean: list[float], std: list[float]) -> None:
        super().__init__()
        z, h = cfg.latent_dim, cfg.hidden
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).clamp(min=1e-6))
        self.transition_mean = mlp(z, h, z)             # G(z) = z + MLP(z)
        self.transition_var = mlp(z, h, z)              # S(z) = softplus(MLP(z))
        self.emission = mlp(z, h, obs_dim)              # F(z)
        self.log_var_y = nn.Parameter(torch.full((obs_dim,), math.log(0.1)))
        self.rnn = nn.GRU(2 * obs_dim, h, batch_first=True)
        self.combine = nn.Linear(z, h)
        self.q_mean, self.q_var = nn.Linear(h, z), nn.Linear(h, z)
        self.latent_dim = z

    def _standardise(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = (y.float() - self.mean) / self.std
        observed = ~torch.isnan(y)
        return torch.nan_to_num(y), observed

    def _infer(self, y: torch.Tensor, sample: bool) -> tuple[torch.Tensor, ...]:
        """Posterior means, variances, the latent path used, and the prior of each step."""
        y0, observed = self._standardise(y)
        N, T, _ = y0.shape
        h_right, _ = self.rnn(torch.cat([y0, observed.float()], -1).flip(1))
        h_right = h_right.flip(1)                              # h_t summarises y_{t:T}
        z_prev = y0.new_zeros(N, self.latent_dim)
        mus, vars_, zs, prior_mus, prior_vars = [], [], [], [], []
        for t in range(T):
            if t == 0:
                prior_mu, prior_var = torch.zeros_like(z_prev), torch.ones_like(z_prev)
            else:
                prior_mu = z_prev + self.transition_mean(z_prev)
                prior_var = F.softplus(self.transition_var(z_prev)) + 1e-4
            h = 0.5 * (torch.tanh(self.combine(z_prev)) + h_right[:, t])
            mu, var = self.q_mean(h), F.softplus(self.q_var(h)) + 1e-4
            z_prev = mu + var.sqrt() * torch.randn_like(mu) if sample else mu
            for lst, v in zip((mus, vars_, zs, prior_mus, prior_vars), (mu, var, z_prev, prior_mu, prior_var),
                              strict=True):
                lst.append(v)
        return tuple(torch.stack(v, 1) for v in (mus, vars_, zs, prior_mus, prior_vars))

    def elbo_terms(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ELBO's two terms per step, each (N, T), from one reparameterised path z ~ q:

            E_q[ log N(y_t; F(z_t), σ_y²) ]          (0 where y_t is missing; of y in its own units:
                                                     log p(y) = log p(y_std) - Σ log std over observed values)
            KL( q(z_t | z_{t-1}, y_{t:T}) || p(z_t | z_{t-1}) )"""
        y0, observed = self._standardise(y)
        mu, var, z, prior_mu, prior_var = self._infer(y, sample=True)
        var_y = self.log_var_y.exp()
        log_lik = -0.5 * (math.log(2 * math.pi) + self.log_var_y + (y0 - self.emission(z)) ** 2 / var_y)
        log_lik = torch.where(observed, log_lik, torch.zeros_like(log_lik)).sum(-1)
        log_lik = log_lik - (observed * torch.log(self.std)).sum(-1)
        return log_lik, gaussian_kl(mu, var, prior_mu, prior_var)

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_lik, kl = self.elbo_terms(y)
        return log_lik - kl, torch.ones_like(kl, dtype=torch.bool)

    @torch.no_grad()
    def posterior_mean(self, y: torch.Tensor) -> torch.Tensor:
        """E_q[z_t] along the posterior-mean path, (N, T, latent_dim)."""
        return self._infer(y, sample=False)[0]

    def param_metrics(self) -> dict[str, torch.Tensor]:
        return {}

    @torch.no_grad()
    def latent_bands(self, y: torch.Tensor) -> dict[str, Band]:
        """The posterior of each latent coordinate of the first series along its posterior-mean path,
        `z[i]`: μ_t,i ± sqrt(σ²_t,i) for q(z_t | z_{t-1} = μ_{t-1}, y_{t:T})."""
        mu, var, *_ = self._infer(y[:1], sample=False)
        t = torch.arange(y.shape[1])
        return {f"z[{i}]": Band(t, mu[0, :, i], var[0, :, i].sqrt()) for i in range(self.latent_dim)}

    @torch.no_grad()
    def reconstruction(self, y: torch.Tensor) -> Band:
        """The first series' first column as the emission reads it from the posterior means, in data units:
        F(E_q[z_t]) · std + mean ± σ_y · std."""
        mu = self._infer(y[:1], sample=False)[0]
        recon = self.emission(mu[0]) * self.std + self.mean
        sd = (self.log_var_y.exp().sqrt() * self.std)[0].expand(y.shape[1])
        return Band(torch.arange(y.shape[1]), recon[:, 0], sd)


@register_model("deep_kalman", family="state-space", config=DeepKalmanConfig, task="time-series",
                recipe={"epochs": 40, "batch_size": 32, "optim": {"lr": 3e-3}})
def deep_kalman(cfg: DeepKalmanConfig, data_info: dict) -> DeepKalmanFilter:
    """Deep Kalman filter: neural transition and emission, backward-GRU inference, trained on the ELBO."""
    p = int(data_info.get("obs_dim", 1))
    return DeepKalmanFilter(cfg, p, data_info.get("obs_mean", [0.0] * p), data_info.get("obs_std", [1.0] * p))
