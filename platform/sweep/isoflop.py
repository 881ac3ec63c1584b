"""IsoFLOP searches (Hoffmann et al. 2022, approach 2): which sizes each budget trains, on how much data, and
what the profiles say.

For a budget C the sizes trained are the `sizes_per_budget` of the file's sizes nearest (in log N) to
N_c = sqrt(C / (6 r)), the size at which D / N = r tokens per parameter; each trains on D = C / (6 N)
targets, set by whole epochs and the share of the training split (`data.train_fraction`). A budget whose
sizes do not reach N_c on both sides is refused before Ray starts. The fits (`sweep.scaling`) use every
budget but the largest, whose N_opt and L_opt they then predict:

    N_opt = G_N C^a,   D_opt = G_D C^b,   L_opt = (C_c / C)^alpha_C
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raycraft.errors import UserError
from raycraft.plots import plt
from raycraft.sweep.scaling import Fit, IsoFLOP, fit_allocation, fit_power_law, isoflop_profile

if TYPE_CHECKING:
    from raycraft.sweep.scaling_job import Point


def pick_sizes(budget: float, n: list[float], k: int, tokens_per_param: float) -> list[int]:
    """Indices of the `k` sizes (by their N, `n`) nearest N_c = sqrt(C / (6 r)) in log N, smallest first."""
    centre = math.sqrt(budget / (6 * tokens_per_param))
    order = sorted(range(len(n)), key=lambda i: n[i])
    start = min(range(len(order) - k + 1),
                key=lambda s: abs(math.log(n[order[s]] * n[order[s + k - 1]]) / 2 - math.log(centre)))
    picked = order[start:start + k]
    if not n[picked[0]] < centre < n[picked[-1]]:
        raise UserError(f"budgets: at C={budget:.3g} FLOPs the sizes should straddle N={centre:.3g} "
                        f"(D/N = {tokens_per_param:g}), but the sizes given span N={min(n):.3g}..{max(n):.3g}; "
                        "add sizes or change the budget.")
    return picked


def data_for(budget: float, n: float, per_epoch: float) -> dict[str, Any]:
    """Job overrides that train a model of N = `n` on D = C / 6N targets, given D of one full epoch."""
    target = budget / (6 * n)
    epochs = max(1, math.ceil(target / per_epoch))
    return {"epochs": epochs, "data.train_fraction": target / (epochs * per_epoch)}


def profiles_of(points: list[Point]) -> list[IsoFLOP]:
    """Each budget's parabola of loss against log N, budgets in increasing order."""
    budgets = sorted({p.budget for p in points})
    return [isoflop_profile(c, np.array([p.n for p in points if p.budget == c]),
                            np.array([p.loss for p in points if p.budget == c])) for c in budgets]


def analyse_isoflop(points: list[Point]) -> tuple[dict[str, Fit], dict[str, float], list[IsoFLOP]]:
    """(fits, held-out relative errors, profiles): N_opt ~ C^a ("a"), D_opt ~ C^b ("b") and L_opt(C)
    ("L_opt") over every budget but the largest, and their errors on it."""
    profiles = profiles_of(points)
    seen, last = profiles[:-1], profiles[-1]
    fits = fit_allocation(seen)
    fits["L_opt"] = fit_power_law(np.array([p.compute for p in seen]), np.array([p.loss_opt for p in seen]))
    held = {"L_opt": abs(float(fits["L_opt"].predict(last.compute)) - last.loss_opt) / last.loss_opt,
            "N_opt": abs(float(fits["a"].predict(last.compute)) - last.n_opt) / last.n_opt}
    return fits, held, profiles


def isoflop_png(metric: str, points: list[Point], fits: dict[str, Fit], profiles: list[IsoFLOP],
                path: Path) -> None:
    """Left: the loss against N at each budget, its parabola and minimum. Right: N_opt and D_opt against C
    with their fits; the largest budget, held out, hollow."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for i, profile in enumerate(profiles):
        pts = sorted((p for p in points if p.budget == profile.compute), key=lambda p: p.n)
        ns = np.array([p.n for p in pts])
        left.scatter(ns, [p.loss for p in pts], color=f"C{i}", s=14, label=f"C={profile.compute:.2g}")
        grid = np.geomspace(ns.min(), ns.max(), 50)
        left.plot(grid, profile.predict(grid), color=f"C{i}", lw=0.8)
        left.scatter([profile.n_opt], [profile.loss_opt], color=f"C{i}", marker="*", s=90, edgecolors="k")
    left.set(xscale="log", xlabel="N (non-embedding parameters)", ylabel=metric,
             title="stars: each budget's fitted minimum")
    c = np.array([p.compute for p in profiles])
    grid = np.geomspace(c.min(), c.max(), 50)
    for key, law, name, colour in (("n_opt", "a", "N_opt", "C0"), ("d_opt", "b", "D_opt", "C1")):
        values = [getattr(p, key) for p in profiles]
        right.scatter(c[:-1], values[:-1], color=colour)
        right.scatter(c[-1:], values[-1:], facecolors="none", edgecolors=colour, s=60)
        right.plot(grid, fits[law].predict(grid), "--", color=colour,
                   label=f"{name} ~ C^{fits[law].params['exponent']:.3f}±{fits[law].stderr['exponent']:.2g}")
    right.set(xscale="log", yscale="log", xlabel="C (FLOPs, 6ND)", title="hollow: held out, predicted")
    right.xaxis.set_minor_formatter(plt.NullFormatter())  # budgets a few x apart: minor labels overlap
    for ax in (left, right):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
