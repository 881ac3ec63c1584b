"""Lottery tickets (Frankle & Carbin 2019): iterative magnitude pruning (IMP) with rewinding.

A dense network f(x; θ_0) holds a subnetwork f(x; m ⊙ θ_0), m ∈ {0, 1}^|θ|, that trained alone matches
the dense network's accuracy. IMP finds the mask m:

    1. train θ for E epochs, remembering θ_k, the weights after k epochs (k = 0: the initialisation)
    2. prune:  m ← m ⊙ 1[|θ_E| ≥ q], q chosen over the weights m still keeps (globally, across layers)
               so that a fraction p of them goes
    3. rewind: θ ← m ⊙ θ_k, and repeat from 1 until the sparsity 1 − |m|₁/|θ| reaches its target

The ticket is then trained once more from m ⊙ θ_k; the control trains the same mask from a fresh random
initialisation m ⊙ θ'_0. Pruned weights stay zero through training: the mask is re-applied after every
optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from raycraft.train.config import PruneConfig

State = dict[str, torch.Tensor]


def prunable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights IMP prunes: those of linear and convolutional layers, by state-dict name."""
    layers = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return {f"{name}.weight" if name else "weight": m.weight for name, m in model.named_modules()
            if isinstance(m, layers)}


def round_sparsities(target: float, rate: float) -> list[float]:
    """Sparsity after each round: s_r = 1 − (1 − p)^r while below the target, then the target itself."""
    out: list[float] = []
    while target > 0 and (not out or out[-1] < target):
        out.append(min(1 - (1 - rate) ** (len(out) + 1), target))
    return out


class Ticket:
    """A mask over a model's prunable weights (True: kept)."""

    def __init__(self, model: nn.Module, masks: State | None = None) -> None:
        self.weights = prunable(model)
        masks = masks or {n: torch.ones_like(w, dtype=torch.bool) for n, w in self.weights.items()}
        if set(masks) != set(self.weights):
            raise ValueError(f"ticket masks {sorted(masks)} do not match the model's weights {sorted(self.weights)}")
        self.masks = {n: m.to(self.weights[n].device) for n, m in masks.items()}

    def sparsity(self) -> float:
        kept = sum(int(m.sum()) for m in self.masks.values())
        return 1 - kept / sum(m.numel() for m in self.masks.values())

    def prune_to(self, sparsity: float) -> None:
        """Keep the round((1 − sparsity)·|θ|) largest |θ| among the weights still kept, across all layers."""
        names = list(self.weights)
        scores = torch.cat([torch.where(self.masks[n], self.weights[n].detach().abs(), -1.0).flatten()
                            for n in names])
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep[scores.topk(round((1 - sparsity) * scores.numel())).indices] = True
        for n, part in zip(names, keep.split([self.weights[n].numel() for n in names]), strict=True):
            self.masks[n] = part.view_as(self.weights[n]).to(self.masks[n].device)

    @torch.no_grad()
    def apply(self) -> None:
        for n, w in self.weights.items():
            w.mul_(self.masks[n])


def clone_state(model: nn.Module) -> State:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def find_ticket(model: nn.Module, cfg: PruneConfig,
                train_round: Callable[[Ticket, Callable[[int], None]], dict[str, float]],
                fresh_state: Callable[[], State]) -> tuple[Ticket, list[tuple[float, dict[str, float]]]]:
    """Run IMP on `model` in place and leave it holding the weights the final training starts from.

    `train_round(ticket, after_epoch)` trains the model once with the ticket applied, calling
    `after_epoch(e)` after each epoch, and returns validation metrics; `fresh_state()` is a new random
    initialisation (for `reinit`). Returns the ticket and, per round, (sparsity it trained at, metrics).
    """
    ticket = Ticket(model)
    rewind = clone_state(model) if cfg.rewind_epoch == 0 else None

    def remember(epoch: int) -> None:
        nonlocal rewind
        if rewind is None and epoch + 1 == cfg.rewind_epoch:
            rewind = clone_state(model)

    rounds = []
    for target in round_sparsities(cfg.sparsity, cfg.rate):
        rounds.append((ticket.sparsity(), train_round(ticket, remember)))
        ticket.prune_to(target)
        model.load_state_dict(rewind)
        ticket.apply()
    if cfg.reinit:
        model.load_state_dict(fresh_state())
        ticket.apply()
    return ticket, rounds
