"""Portfolio allocation over synthetic correlated assets: a continuous-action task for DDPG.

The survey's deep-RL applications include asset allocation. Here n assets have returns that follow a
vector AR(1) process with correlated shocks, so yesterday's returns carry a signal about tomorrow's:

    r_{t+1} = μ + φ ⊙ (r_t − μ) + L ε_{t+1},     ε ~ N(0, I),   Σ = L Lᵀ = σ² (ρ 1 1ᵀ + (1 − ρ) I)

The agent's action a ∈ [−1, 1]^n is turned into portfolio weights w = softmax(κ a) (long only, Σ w = 1).
Holding w over the step earns the log return, less a proportional cost for trading:

    reward_t = scale · ( log(1 + wᵀ r_{t+1}) − c ‖w − w_prev‖₁ )

The observation is [r_t / σ, w_prev] (returns in units of the shock size). An episode lasts `horizon`
steps (then it is truncated).
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np


@dataclass(frozen=True)
class PortfolioParams:
    n_assets: int = 3
    horizon: int = 50
    mu: tuple[float, ...] = (0.001, 0.0005, 0.0)
    phi: float = 0.6
    sigma: float = 0.02
    rho: float = 0.3
    cost: float = 0.0005
    kappa: float = 5.0
    scale: float = 100.0


class PortfolioEnv(gym.Env):
    """Allocate wealth over correlated AR(1) assets; reward = scaled log return less trading costs."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, render_mode: str | None = None, **params) -> None:
        self.p = PortfolioParams(**params)
        n = self.p.n_assets
        if len(self.p.mu) != n:
            raise ValueError(f"mu has {len(self.p.mu)} entries for {n} assets")
        self.mu = np.asarray(self.p.mu, dtype=np.float64)
        cov = self.p.sigma ** 2 * (self.p.rho * np.ones((n, n)) + (1 - self.p.rho) * np.eye(n))
        self.L = np.linalg.cholesky(cov)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (n,), np.float32)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (2 * n,), np.float32)
        self.render_mode = render_mode
        self.wealth_path: list[float] = []

    def weights(self, action: np.ndarray) -> np.ndarray:
        z = self.p.kappa * np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        e = np.exp(z - z.max())
        return e / e.sum()

    def _obs(self) -> np.ndarray:
        return np.concatenate([self.r / self.p.sigma, self.w]).astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        n = self.p.n_assets
        stationary_std = self.p.sigma / np.sqrt(1 - self.p.phi ** 2)
        self.r = self.mu + stationary_std * self.np_random.standard_normal(n)
        self.w = np.full(n, 1.0 / n)
        self.t = 0
        self.wealth_path = [1.0]
        return self._obs(), {}

    def step(self, action):
        w = self.weights(action)
        r_next = self.mu + self.p.phi * (self.r - self.mu) + self.L @ self.np_random.standard_normal(self.p.n_assets)
        growth = 1.0 + float(w @ r_next)
        turnover = float(np.abs(w - self.w).sum())
        reward = self.p.scale * (np.log(max(growth, 1e-8)) - self.p.cost * turnover)
        self.r, self.w, self.t = r_next, w, self.t + 1
        self.wealth_path.append(self.wealth_path[-1] * growth)
        return self._obs(), reward, False, self.t >= self.p.horizon, {"growth": growth, "turnover": turnover}

    def render(self) -> np.ndarray:
        """Wealth so far as a line on a 128×256 canvas (white background, black line)."""
        h, width = 128, 256
        img = np.full((h, width, 3), 255, np.uint8)
        path = np.asarray(self.wealth_path)
        lo, hi = min(path.min(), 0.9), max(path.max(), 1.1)
        xs = np.linspace(0, width - 1, self.p.horizon + 1)[: len(path)].astype(int)
        ys = (h - 1 - (path - lo) / (hi - lo) * (h - 1)).astype(int)
        for x0, y0, x1, y1 in zip(xs[:-1], ys[:-1], xs[1:], ys[1:], strict=True):
            for s in np.linspace(0, 1, max(abs(x1 - x0), abs(y1 - y0)) + 1):
                img[int(round(y0 + s * (y1 - y0))), int(round(x0 + s * (x1 - x0)))] = 0
        return img


def equal_weight_policy(obs: np.ndarray) -> np.ndarray:
    """The 1/N heuristic: a = 0 gives w = softmax(0) = equal weights every step."""
    return np.zeros(len(obs) // 2, dtype=np.float32)
