"""`raycraft tune`: run or resume a sweep file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from raycraft.console import AddressOpt, SetOpt, TrackingOpt, console, format_number
from raycraft.errors import UserError
from raycraft.extras import require_extra
from raycraft.sweep.config import load_sweep
from raycraft.sweep.engine import resume_sweep, run_sweep
from raycraft.tracking import resolve_tracking_uri, ui_command

app = typer.Typer()


@app.command("tune")
def tune(
    file: Annotated[Optional[Path], typer.Argument(help="Sweep YAML file (see tune_configs/).")] = None,
    samples: Annotated[Optional[int], typer.Option("--samples", help="Trials to sample.")] = None,
    set_: SetOpt = None,
    resume: Annotated[Optional[str], typer.Option(
        "--resume", help="Continue the interrupted sweep NAME (finished trials are not run again).")] = None,
    tracking_uri: TrackingOpt = None,
    address: AddressOpt = None,
):
    """Search hyperparameters of a train or rl job with Ray Tune; one MLflow parent run, a child run per trial.

    `--set key=value` changes the sweep (name, metric, scheduler.name, ...) or, for any other key, the job
    (optim.lr, epochs, dropout, lr, dqn.target_update_freq, ...)."""
    if resume:
        storage = load_sweep(file, set_ or []).config.storage_path if file else "ray_results"
        outcome = resume_sweep(resume, storage, tracking_uri=tracking_uri, address=address, echo=console.print)
    elif file is None:
        raise UserError("tune: give a sweep FILE (or --resume NAME).")
    else:
        outcome = run_sweep(load_sweep(file, set_ or [], samples), tracking_uri=tracking_uri, address=address,
                            echo=console.print)
    console.print(f"[green]done[/]  sweep {outcome.name}: {len(outcome.children)} trials, parent run "
                  f"[bold]{outcome.parent_run_id}[/]")
    if outcome.best_run_id:
        console.print(f"best run {outcome.best_run_id}: {format_number(outcome.best_metric)} with " +
                      ", ".join(f"{k}={v}" for k, v in outcome.best_params.items()))
    console.print(f"MLflow UI: {ui_command(resolve_tracking_uri(tracking_uri), outcome.parent_run_id)}")


@app.command("scaling")
def scaling(
    file: Annotated[Path, typer.Argument(help="Scaling YAML file (see tune_configs/scaling_*.yaml).")],
    resume: Annotated[Optional[str], typer.Option(
        "--resume", help="Continue the interrupted search NAME from FILE (finished points are kept).")] = None,
    tracking_uri: TrackingOpt = None,
    address: AddressOpt = None,
):
    """Train model sizes x data amounts (or IsoFLOP budgets) as Tune trials; fit the laws, predict the held-out runs.

    `--resume NAME` continues a killed search from the same FILE: finished points are kept, the others rerun."""
    require_extra("tune", "raycraft scaling")
    from raycraft.sweep.scaling_job import load_scaling, run_scaling  # scipy: the `tune` extra, checked above

    cfg, points = load_scaling(file, resume)
    parent, result = run_scaling(cfg, points, tracking_uri=tracking_uri, address=address, resume=bool(resume),
                                 echo=console.print)
    for law, fit in result.fits.items():
        console.print(f"{law}: " + ", ".join(f"{k}={v:.4g}±{fit.stderr[k]:.2g}" for k, v in fit.params.items())
                      + f"  (rms log residual {fit.rmse_log:.3g})")
    console.print("held-out relative error: " + ", ".join(f"{k} {v:.2%}" for k, v in result.held_out.items()))
    n_opt, d_opt = result.optimal
    console.print(f"compute-optimal at C={cfg.budget:.3g} FLOPs: N={n_opt:.4g}, D={d_opt:.4g}")
    console.print(f"[green]done[/]  MLflow parent run [bold]{parent}[/] (plots under scaling/)")
    console.print(f"MLflow UI: {ui_command(resolve_tracking_uri(tracking_uri), parent)}")
