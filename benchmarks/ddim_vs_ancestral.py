"""DDIM with few steps against full ancestral sampling of one trained DDPM run: same noise seed, same n.

    python benchmarks/ddim_vs_ancestral.py RUN_ID [N] [DDIM_STEPS]

Prints FID (raycraft <dataset> classifier), classes covered and sampling time of each sampler (DDIM with
eta 0, deterministic, and eta 1), and for each DDIM the FID ratio (DDIM / ancestral) and the speed-up
(ancestral time / DDIM time).
"""

from __future__ import annotations

import sys

import torch

from raycraft.generative.commands import generate, load_generative_run
from raycraft.generative.metrics import classifier_for, fid_key


def main(run_id: str, n: int = 500, ddim_steps: int = 50) -> None:
    torch.set_num_threads(1)
    model, cfg, info = load_generative_run(run_id, None)
    clf = classifier_for(info["dataset"], info.get("data_dir"))
    results = {}
    for name, sampler, steps, eta in (("ddim eta=0", "ddim", ddim_steps, 0.0), ("ddim eta=1", "ddim", ddim_steps, 1.0),
                                      ("ancestral", "ancestral", None, None)):
        images, seconds = generate(model, n, 0, sampler, steps, batch=n, eta=eta)
        s = clf.score(images)
        results[name] = (s[fid_key(cfg.dataset)], seconds)
        print(f"{name:10s} steps={steps or model.cfg.timesteps:4d} n={n}: FID (raycraft {cfg.dataset} classifier) "
              f"{s[fid_key(cfg.dataset)]:.2f}  classes covered {s['classes_covered']:.0f}  sampling {seconds:.1f} s",
              flush=True)
    fid_a, t_a = results.pop("ancestral")
    for name, (fid_d, t_d) in results.items():
        print(f"{name}: FID ratio ddim/ancestral {fid_d / fid_a:.3f}   speed-up {t_a / t_d:.1f}x")

if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:]))
