"""`raycraft sample RUN_ID`: samples from a trained generative run as a PNG grid, optionally with metrics.

The model is rebuilt from the run's config.yaml and its final `checkpoint/state.pt` (weights only, no
pickle), so any sampler and step count can be used, not only the one in the logged export.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from raycraft import tracking
from raycraft.console import TrackingOpt, console, progress_bar
from raycraft.errors import UserError, check_count, invalid_choice
from raycraft.evaluate import rebuild_model, run_config
from raycraft.generative.images import save_grid
from raycraft.generative.metrics import classifier_for, fid_key
from raycraft.models.ddpm import SAMPLERS
from raycraft.registry import load_dataset

app = typer.Typer()

MAX_SAMPLES = 100_000  # all samples are held in memory: 100,000 CIFAR-size images are 1.2 GB of float32
BATCH = 500  # samples drawn per model call; progress shows once there is more than one batch


def load_generative_run(run_id: str, tracking_uri: str | None):
    """(model in eval mode, TrainConfig, data info) of a finished generative run."""
    uri = tracking.resolve_tracking_uri(tracking_uri)
    cfg, _ = run_config(uri, run_id, "generative", "`raycraft sample`")
    info = load_dataset(cfg.dataset, cfg.data).info
    return rebuild_model(uri, run_id, cfg, info), cfg, info


def generate(model, n: int, seed: int, sampler: str | None, steps: int | None, batch: int = BATCH,
             eta: float | None = None, progress=None):
    """n samples in batches, and the seconds they took; `progress(k)` is called after each batch of k."""
    g = torch.Generator().manual_seed(seed)
    kwargs = {k: v for k, v in {"sampler": sampler, "steps": steps, "eta": eta}.items() if v is not None}
    start = time.perf_counter()
    batches = []
    with torch.no_grad():
        for i in range(0, n, batch):
            batches.append(model.sample(min(batch, n - i), g, **kwargs))
            if progress:
                progress(len(batches[-1]))
    return torch.cat(batches), time.perf_counter() - start


@app.command("sample")
def sample(
    run_id: Annotated[str, typer.Argument(help="MLflow run id of a generative `raycraft train` run.")],
    n: Annotated[int, typer.Option("--n", help="Number of samples.")] = 64,
    out: Annotated[Path, typer.Option("--out", help="PNG file for the sample grid.")] = Path("samples.png"),
    sampler: Annotated[Optional[str], typer.Option(help="ddpm only: ancestral (all T steps) or ddim.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="ddpm with --sampler ddim: number of DDIM steps.")] = None,
    eta: Annotated[Optional[float], typer.Option(
        help="ddpm with --sampler ddim: 0 deterministic, 1 DDPM's noise on the shortened chain.")] = None,
    metrics: Annotated[bool, typer.Option("--metrics", help="Also print FID (raycraft classifier) and mode "
                                                             "coverage of the n samples (use --n 1000).")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the noise.")] = 0,
    tracking_uri: TrackingOpt = None,
):
    """Draw --n samples from RUN_ID's generative model into a PNG grid; --metrics scores them."""
    torch.set_num_threads(1)
    check_count("--n", n, MAX_SAMPLES)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out: {str(out)!r} must be a .png file.")
    if sampler is not None and sampler not in SAMPLERS:
        raise invalid_choice("--sampler", sampler, SAMPLERS)
    if steps is not None:
        check_count("--steps", steps)
    model, cfg, info = load_generative_run(run_id, tracking_uri)
    if (sampler or steps or eta is not None) and cfg.model != "ddpm":
        raise UserError(f"--sampler/--steps/--eta: only ddpm has samplers; run {run_id} trained {cfg.model!r}.")
    if (steps is not None or eta is not None) and (sampler or model.cfg.sampler) != "ddim":
        raise UserError("--steps/--eta: set DDIM's step count and noise; ancestral sampling always takes all T "
                        "steps. Add --sampler ddim.")
    if eta is not None and eta < 0:
        raise UserError(f"--eta: {eta} must be >= 0.")
    with progress_bar(f"drawing {n:,} samples", n, show=n > BATCH) as advance:
        images, seconds = generate(model, n, seed, sampler, steps, eta=eta, progress=advance)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(images[:256], out)
    console.print(f"wrote {min(n, 256)} of {n} samples to {out} ({seconds:.1f} s sampling)")
    if metrics:
        clf = classifier_for(info["dataset"], info.get("data_dir"))
        scores = clf.score(images)
        fid = scores[fid_key(cfg.dataset)]
        console.print(f"FID (raycraft {cfg.dataset} classifier, test accuracy {clf.accuracy:.3f}): {fid:.2f}  "
                      f"classes covered: {int(scores['classes_covered'])}/{info['num_classes']}  "
                      f"mode KL to uniform: {scores['mode_kl']:.3f}  (n={n})")
