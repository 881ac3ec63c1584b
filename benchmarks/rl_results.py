"""What the RL benchmarks measure per run, and their summary: medians per setup and the wall-time ratio
of raycraft's median to its peer's (benchmarks/sb3_zoo.py)."""

from __future__ import annotations

import statistics
from typing import NamedTuple

PEER = "sb3-zoo"


class Result(NamedTuple):
    steps: float
    wall_s: float
    best_eval: float


def median(results: list[Result], field: str) -> float:
    return statistics.median(getattr(r, field) for r in results)


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
            print(f"wall-time ratio of the medians, raycraft / {name}: {ratio:.2f}"
                  + (f" (goal <= {goal:g})" if name == PEER else ""))
