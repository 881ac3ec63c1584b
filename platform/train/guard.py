"""Divergence guard: a run whose loss explodes (or whose gradients stay huge) stops FAILED, not FINISHED.

Per optimizer, after every step, on the device (no host sync):

    m_t = β m_{t−1} + (1 − β) ℓ_t            smoothed loss (m_1 = ℓ_1)
    m*_t = min(m*_{t−1}, m_t)                its lowest value so far
    over_t = m*_t > 0 and m_t > k · m*_t     or, with a bound g, ‖∇θ‖ > g

The guard trips once `over` holds for `patience` consecutive steps. A loss that can be negative (a WGAN
critic, a Gaussian negative log-likelihood) has m* ≤ 0, where a ratio means nothing: only the gradient
bound applies to it. The loop reads the flag once per epoch, all-reduced with the epoch's metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raycraft.errors import UserError, check_count
from raycraft.registry import field_doc

BETA = 0.9  # ~10 steps of smoothing: one bad batch is not a divergence


@dataclass
class GuardConfig:
    """When a run counts as diverged (it then stops FAILED at the end of that epoch)."""

    loss_factor: float = field_doc(
        1e4, "Stop when the smoothed training loss exceeds this multiple of its lowest value so far (for "
             "`patience` steps); 0 turns the loss test off.")
    grad_norm: float | None = field_doc(
        None, "Stop when the global gradient norm (before clipping) exceeds this for `patience` steps; None: off.")
    patience: int = field_doc(20, "Consecutive steps the condition must hold, so one spike does not stop a run.")

    def __post_init__(self) -> None:
        if self.loss_factor < 0 or 0 < self.loss_factor <= 1:
            raise UserError(f"guard.loss_factor: {self.loss_factor} must be above 1 (or 0 for off).")
        if self.grad_norm is not None and self.grad_norm <= 0:
            raise UserError(f"guard.grad_norm: {self.grad_norm} must be > 0 (or null for off).")
        check_count("guard.patience", self.patience)


class DivergenceGuard:
    """One optimizer's guard; `observe` after each step, `tripped` (a 0/1 tensor) and `reason` per epoch."""

    def __init__(self, cfg: GuardConfig, device: torch.device) -> None:
        self.cfg = cfg
        zero = torch.zeros((), device=device)
        self.smooth, self.low, self.streak, self.tripped = zero.clone(), zero.clone(), zero.clone(), zero.clone()
        self.worst, self.steps = zero.clone(), 0

    def observe(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        loss = loss.detach().float()
        self.smooth = loss if self.steps == 0 else BETA * self.smooth + (1 - BETA) * loss
        self.low = self.smooth if self.steps == 0 else torch.minimum(self.low, self.smooth)
        self.steps += 1
        over = torch.zeros((), dtype=torch.bool, device=loss.device)
        if self.cfg.loss_factor:
            over = over | ((self.low > 0) & (self.smooth > self.cfg.loss_factor * self.low))
        if self.cfg.grad_norm is not None and grad_norm is not None:
            over = over | (grad_norm.detach().float() > self.cfg.grad_norm)
        self.streak = (self.streak + 1) * over
        self.worst = torch.maximum(self.worst, self.smooth)
        self.tripped = torch.maximum(self.tripped, (self.streak >= self.cfg.patience).float())

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        """What a resumed run's guard continues from: its lowest smoothed loss above all."""
        return {"smooth": self.smooth, "low": self.low, "steps": self.steps}

    def load_state_dict(self, state: dict[str, torch.Tensor | int]) -> None:
        self.smooth, self.low = (state[k].to(self.smooth.device) for k in ("smooth", "low"))
        self.steps = int(state["steps"])

    def reason(self, name: str) -> str:
        what = (f"smoothed loss reached {self.worst.item():.3g}, over {self.cfg.loss_factor:g}x its lowest "
                f"{self.low.item():.3g}") if self.cfg.loss_factor else ""
        if self.cfg.grad_norm is not None:
            what = f"{what + ' or ' if what else ''}gradient norm above {self.cfg.grad_norm:g}"
        return f"optimizer {name!r}: {what} for {self.cfg.patience} steps"
