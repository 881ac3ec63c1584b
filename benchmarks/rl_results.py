"""What the RL benchmarks measure per run, and their summary: medians per setup and the wall-time ratio
of raycraft's median to its peer's (benchmarks/sb3_zoo.py), with a bootstrap interval over the seeds.

The steps a run needs can depend on its seed more than on the library (rl_cartpole.py gives an example);
the interval says how far a ratio of medians over this many seeds can be trusted.
"""

from __future__ import annotations

import random
import statistics
from typing import NamedTuple

PEER = "sb3-zoo"


class Result(NamedTuple):
    steps: float
    wall_s: float
    best_eval: float


def median(results: list[Result], field: str) -> float:
    return statistics.median(getattr(r, field) for r in results)


def ratio_interval(ours: list[float], theirs: list[float], level: float = 0.9, draws: int = 10_000,
                   seed: int = 0) -> tuple[float, float]:
    """The `level` percentile-bootstrap interval of median(ours) / median(theirs): each side's runs
    resampled with replacement on their own (the two libraries' runs of a seed share no randomness)."""
    rng = random.Random(seed)
    ratios = sorted(statistics.median(rng.choices(ours, k=len(ours)))
                    / statistics.median(rng.choices(theirs, k=len(theirs))) for _ in range(draws))
    tail = int(draws * (1 - level) / 2)
    return ratios[tail], ratios[draws - 1 - tail]


def report(rows: dict[str, list[Result]], target: float, goal: float) -> None:
    """Per setup: runs that reached `target`, median steps and wall time, wall time per env step; then the
    wall-time ratio of raycraft's median to each other setup's (`goal` is the one against PEER)."""
    print(f"\nto eval return >= {target:g} (a run that did not reach it counts its full length)")
    for name, results in rows.items():
        solved = sum(r.best_eval >= target for r in results)
        per_step = 1000 * sum(r.wall_s for r in results) / sum(r.steps for r in results)
        print(f"{name:12s} solved {solved}/{len(results)}  median steps {median(results, 'steps'):.0f}  "
              f"median wall {median(results, 'wall_s'):.1f} s  ({per_step:.2f} ms per env step)")
    for name, results in rows.items():
        if name != "raycraft":
            ratio = median(rows["raycraft"], "wall_s") / median(results, "wall_s")
            low, high = ratio_interval([r.wall_s for r in rows["raycraft"]], [r.wall_s for r in results])
            print(f"wall-time ratio of the medians, raycraft / {name}: {ratio:.2f}, 90% bootstrap interval over "
                  f"the seeds {low:.2f}-{high:.2f}" + (f" (goal <= {goal:g})" if name == PEER else ""))
