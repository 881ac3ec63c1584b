"""Filter 1000 local-level series of length 1000: raycraft's batched Kalman filter against a loop of
statsmodels filters, at the same fixed parameters, in one run; each time is the best of --repeat runs.
Prints both times, the ratio and the largest log-likelihood difference, then the same filter with a
different missing value in every series (no shared covariance recursion: P, F, K per series).

    .venv/bin/python benchmarks/kalman_batch.py [--series 1000] [--steps 1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from raycraft.models.kalman import kalman_filter

SIGMA2_EPS, SIGMA2_ETA = 15099.0, 1469.1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import statsmodels.api as sm

    rng = np.random.default_rng(0)
    level = 1000 + np.cumsum(rng.normal(0, SIGMA2_ETA ** 0.5, (args.series, args.steps)), 1)
    y = level + rng.normal(0, SIGMA2_EPS ** 0.5, level.shape)

    def statsmodels_loop(series: np.ndarray) -> np.ndarray:
        return np.array([sm.tsa.UnobservedComponents(s, "local level").loglike([SIGMA2_EPS, SIGMA2_ETA])
                         for s in series])

    one = lambda v: torch.tensor([[v]], dtype=torch.float64)  # noqa: E731

    @torch.no_grad()
    def raycraft_batch(series: np.ndarray) -> np.ndarray:
        return kalman_filter(torch.from_numpy(series)[..., None], one(1.0), one(1.0), one(SIGMA2_ETA),
                             one(SIGMA2_EPS)).loglik.numpy()

    def best_time(fn, series: np.ndarray) -> tuple[float, np.ndarray]:
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            out = fn(series)
            times.append(time.perf_counter() - start)
        return min(times), out

    t_sm, ref = best_time(statsmodels_loop, y)
    t_rc, ours = best_time(raycraft_batch, y)
    gappy = y.copy()
    gappy[np.arange(args.series), rng.integers(1, args.steps, args.series)] = np.nan
    t_gap, _ = best_time(raycraft_batch, gappy)

    print(f"{args.series} series x {args.steps} steps, 1 thread, best of {args.repeat}")
    print(f"statsmodels loop : {t_sm:8.2f} s")
    print(f"raycraft batched : {t_rc:8.2f} s")
    print(f"speed-up         : {t_sm / t_rc:8.1f}x")
    print(f"max |loglik diff|: {np.abs(ours - ref).max():.2e}")
    print(f"raycraft, a different missing value in each series: {t_gap:.2f} s ({t_sm / t_gap:.1f}x)")


if __name__ == "__main__":
    main()
