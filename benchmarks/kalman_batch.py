"""Filter 1000 local-level series of length 1000: raycraft's batched Kalman filter against a loop of
statsmodels filters, at the same fixed parameters, in one run. Prints both times, the ratio and the
largest log-likelihood difference.

    .venv/bin/python benchmarks/kalman_batch.py [--series 1000] [--steps 1000]
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
    args = parser.parse_args()
    torch.set_num_threads(1)
    import statsmodels.api as sm

    rng = np.random.default_rng(0)
    level = 1000 + np.cumsum(rng.normal(0, SIGMA2_ETA ** 0.5, (args.series, args.steps)), 1)
    y = level + rng.normal(0, SIGMA2_EPS ** 0.5, level.shape)

    start = time.perf_counter()
    ref = np.array([sm.tsa.UnobservedComponents(s, "local level").loglike([SIGMA2_EPS, SIGMA2_ETA]) for s in y])
    t_sm = time.perf_counter() - start

    one = lambda v: torch.tensor([[v]], dtype=torch.float64)  # noqa: E731
    start = time.perf_counter()
    with torch.no_grad():
        ours = kalman_filter(torch.from_numpy(y)[..., None], one(1.0), one(1.0), one(SIGMA2_ETA),
                             one(SIGMA2_EPS)).loglik.numpy()
    t_rc = time.perf_counter() - start

    print(f"{args.series} series x {args.steps} steps, 1 thread")
    print(f"statsmodels loop : {t_sm:8.2f} s")
    print(f"raycraft batched : {t_rc:8.2f} s")
    print(f"speed-up         : {t_sm / t_rc:8.1f}x")
    print(f"max |loglik diff|: {np.abs(ours - ref).max():.2e}")


if __name__ == "__main__":
    main()
