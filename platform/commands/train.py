"""`raycraft train` (one Ray Train run, tracked in MLflow) and `raycraft eval` (a logged model on a test split)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from raycraft.config import build
from raycraft.console import AddressOpt, EpochProgress, SetOpt, TrackingOpt, console, field_option, format_metrics
from raycraft.errors import UserError
from raycraft.evaluate import evaluate_run
from raycraft.lifecycle import process_start_time
from raycraft.runner import run_training
from raycraft.tracking import EPOCH_KEY, resolve_tracking_uri, ui_command
from raycraft.train.config import TrainConfig, config_layers

app = typer.Typer()


def _epoch_line(m: dict[str, float], epochs: int) -> str:
    shown = {k: v for k, v in m.items() if k != EPOCH_KEY}
    return f"[bold]epoch {int(m.get(EPOCH_KEY, 0)) + 1}/{epochs}[/]  {format_metrics(shown)}"


@app.command("train")
def train(
    ctx: typer.Context,
    model: Annotated[Optional[str], typer.Argument(help="Model name (`raycraft models`).")] = None,
    dataset: field_option(TrainConfig, "dataset", "--dataset") = None,
    workers: field_option(TrainConfig, "workers") = None,
    in_process: field_option(TrainConfig, "in_process", "--in-process") = None,
    gpu: field_option(TrainConfig, "gpu", "--gpu/--cpu") = None,
    epochs: field_option(TrainConfig, "epochs") = None,
    batch_size: field_option(TrainConfig, "batch_size", "--batch-size") = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML file of config keys.")] = None,
    set_: SetOpt = None,
    experiment: field_option(TrainConfig, "experiment") = None,
    address: AddressOpt = None,
    seed: field_option(TrainConfig, "seed") = None,
    data_dir: field_option(TrainConfig, "data.data_dir", "--data-dir") = None,
    tracking_uri: TrackingOpt = None,
    resume: Annotated[Optional[str], typer.Option("--resume", help="MLflow run id to continue.")] = None,
    init_from: field_option(TrainConfig, "init_from", "--init-from") = None,
):
    """Train MODEL on --dataset with Ray Train, logging to MLflow; prints the run id and final metrics."""
    uri = resolve_tracking_uri(tracking_uri)
    flags = {"model": model, "dataset": dataset, "workers": workers, "in_process": in_process, "gpu": gpu,
             "epochs": epochs, "batch_size": batch_size, "experiment": experiment, "seed": seed,
             "data.data_dir": data_dir, "init_from": init_from}
    layers = config_layers(uri, config, resume, flags)
    if not all(any(key in layer for layer in layers) for key in ("model", "dataset")):
        raise UserError("train: name a MODEL and a --dataset (or give both in --config).")
    cfg, _ = build(TrainConfig, layers, set_ or [])

    def on_start(run_id: str) -> None:
        verb = "resuming" if resume else "training"
        where = "in this process" if cfg.in_process else f"with {cfg.workers} worker(s)"
        console.print(f"[cyan]{verb}[/] {cfg.model} on {cfg.dataset} {where}; MLflow run {run_id}")

    started_at = getattr(ctx.obj, "started_at", None) or process_start_time()
    with EpochProgress(cfg.epochs) as shown:
        outcome = run_training(cfg, address=address, tracking_uri=uri, resume_run_id=resume, on_start=on_start,
                               on_epoch=lambda m: shown.ended(_epoch_line(m, cfg.epochs)), on_step=shown.step,
                               started_at=started_at)
    console.print(f"[green]done[/]  run id: [bold]{outcome.run_id}[/]")
    console.print("final: " + format_metrics({k: v for k, v in outcome.metrics.items()
                                              if k.startswith(("test_", "val_", "train_"))}))
    console.print(f"MLflow UI: {ui_command(uri, outcome.run_id)}")


@app.command("eval")
def eval_(
    run_id: Annotated[str, typer.Argument(help="MLflow run id of a `raycraft train` run.")],
    dataset: Annotated[Optional[str], typer.Option(
        "--dataset", help="Evaluate on another dataset's test split.")] = None,
    tracking_uri: TrackingOpt = None,
):
    """Reload the model logged by RUN_ID and report its metrics on the test split."""
    metrics = evaluate_run(run_id, dataset=dataset, tracking_uri=resolve_tracking_uri(tracking_uri))
    console.print(f"run {run_id} on the test split: {format_metrics(metrics)}")
