"""`raycraft tune`: run or resume a sweep file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from raycraft.cli import AddressOpt, SetOpt, TrackingOpt, app, console
from raycraft.errors import UserError


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
    """Search hyperparameters of a train job with Ray Tune; one MLflow parent run, a child run per trial.

    `--set key=value` changes the sweep (name, metric, scheduler.name, ...) or, for any other key, the job
    (optim.lr, epochs, dropout, ...)."""
    from raycraft.sweep.config import load_sweep
    from raycraft.sweep.engine import resume_sweep, run_sweep
    from raycraft.tracking import ui_command

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
        console.print(f"best run {outcome.best_run_id}: {outcome.best_metric:.4g} with " +
                      ", ".join(f"{k}={v}" for k, v in outcome.best_params.items()))
    from raycraft.tracking import resolve_tracking_uri

    console.print(f"MLflow UI: {ui_command(resolve_tracking_uri(tracking_uri))}")
