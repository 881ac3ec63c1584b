"""The `raycraft` command line. Bad input exits with code 2 and a one-paragraph message, no traceback."""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from raycraft.errors import UserError, check_count

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train the survey's model families on Ray, tracked in MLflow.")
CONSOLE_ARGS = ({"soft_wrap": True}, {"stderr": True, "soft_wrap": True})
console, err_console = (Console(**kwargs) for kwargs in CONSOLE_ARGS)

SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key: key=value (repeatable).")]
TrackingOpt = Annotated[Optional[str], typer.Option(
    "--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here).")]
AddressOpt = Annotated[Optional[str], typer.Option(
    "--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a private local Ray).")]


@app.command("models")
def list_models(details: Annotated[Optional[str], typer.Option(help="Show one model's config keys.")] = None):
    """List every registered model with its family and a one-line description."""
    from raycraft.registry import config_fields, model_spec, models

    if details:
        spec = model_spec(details)
        table = Table(title=f"{spec.name} ({spec.family}, {spec.task}): {spec.description}")
        for col in ("key", "default", "meaning"):
            table.add_column(col)
        for name, default, doc in config_fields(spec.config_cls):
            table.add_row(name, repr(default), doc)
        console.print(table)
        return
    table = Table(title="raycraft models")
    for col in ("name", "family", "task", "description"):
        table.add_column(col)
    for spec in models().values():
        table.add_row(spec.name, spec.family, spec.task, spec.description)
    console.print(table)


@app.command("datasets")
def list_datasets():
    """List every registered dataset with its task and a one-line description."""
    from raycraft.registry import datasets

    table = Table(title="raycraft datasets")
    for col in ("name", "task", "needs --data-dir", "description"):
        table.add_column(col)
    for spec in datasets().values():
        table.add_row(spec.name, spec.task, "yes" if spec.needs_data_dir else "", spec.description)
    console.print(table)


def _fmt(metrics: dict[str, float]) -> str:
    keys = [k for k in metrics if k not in ("epoch",)]
    return "  ".join(f"{k} {metrics[k]:.4g}" for k in sorted(keys))


@contextlib.contextmanager
def progress_bar(label: str, total: int, show: bool = True) -> Iterator[Callable[[int], None] | None]:
    """A progress bar on stderr, so stdout keeps only the command's output; yields `advance(n done)`, or
    None (and shows nothing) unless `show`."""
    if not show:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def layered_config(uri: str, config: Path | None, resume: str | None, flags: dict) -> dict:
    """A run's config keys: the resumed run's config.yaml, then the --config file, then the flags given."""
    from raycraft.config import load_yaml, read_yaml
    from raycraft.tracking import download_text, get_run

    base = load_yaml(config) if config else {}
    if resume:
        get_run(uri, resume)
        base = {**read_yaml(download_text(uri, resume, "config.yaml"), f"run {resume}'s config.yaml"), **base}
    base.update({k: v for k, v in flags.items() if v is not None})
    return base


@app.command("train")
def train(
    model: Annotated[Optional[str], typer.Argument(help="Model name (`raycraft models`).")] = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", help="Dataset name (`raycraft datasets`).")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Data-parallel Ray Train workers.")] = None,
    in_process: Annotated[Optional[bool], typer.Option(
        "--in-process", help="Train in this process (Ray Train's local mode): no Ray cluster or worker "
                             "processes, so it starts in seconds; one worker, no worker restarts.")] = None,
    gpu: Annotated[Optional[bool], typer.Option("--gpu/--cpu", help="One GPU per worker.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Passes over the training split.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Examples per step per worker.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML file of config keys.")] = None,
    set_: SetOpt = None,
    experiment: Annotated[Optional[str], typer.Option(help="MLflow experiment name.")] = None,
    address: AddressOpt = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of weights, shuffling and dropout.")] = None,
    data_dir: Annotated[Optional[str], typer.Option("--data-dir", help="Folder of your own data files.")] = None,
    tracking_uri: TrackingOpt = None,
    resume: Annotated[Optional[str], typer.Option("--resume", help="MLflow run id to continue.")] = None,
    init_from: Annotated[Optional[str], typer.Option(
        "--init-from", help="MLflow run id whose final weights start this run (fine-tuning).")] = None,
):
    """Train MODEL on --dataset with Ray Train, logging to MLflow; prints the run id and final metrics."""
    from raycraft.runner import run_training
    from raycraft.tracking import resolve_tracking_uri, ui_command
    from raycraft.train.config import build_config

    uri = resolve_tracking_uri(tracking_uri)
    flags = {"model": model, "dataset": dataset, "workers": workers, "in_process": in_process, "gpu": gpu,
             "epochs": epochs, "batch_size": batch_size, "experiment": experiment, "seed": seed,
             "init_from": init_from}
    base = layered_config(uri, config, resume, flags)
    if data_dir is not None:
        base.setdefault("data", {})["data_dir"] = data_dir
    if "model" not in base or "dataset" not in base:
        raise UserError("train: name a MODEL and a --dataset (or give both in --config).")
    cfg, _ = build_config(base, set_ or [])

    def on_epoch(m: dict[str, float]) -> None:
        console.print(f"[bold]epoch {int(m.get('epoch', 0)) + 1}/{cfg.epochs}[/]  {_fmt(m)}")

    def on_start(run_id: str) -> None:
        verb = "resuming" if resume else "training"
        where = "in this process" if cfg.in_process else f"with {cfg.workers} worker(s)"
        console.print(f"[cyan]{verb}[/] {cfg.model} on {cfg.dataset} {where}; MLflow run {run_id}")

    from raycraft import warm
    from raycraft.lifecycle import process_start_time

    outcome = run_training(cfg, address=address, tracking_uri=uri, resume_run_id=resume, on_epoch=on_epoch,
                           on_start=on_start, started_at=warm.client_started_at or process_start_time())
    console.print(f"[green]done[/]  run id: [bold]{outcome.run_id}[/]")
    console.print("final: " + _fmt({k: v for k, v in outcome.metrics.items()
                                    if k.startswith(("test_", "val_", "train_"))}))
    console.print(f"MLflow UI: {ui_command(uri)}")


@app.command("eval")
def eval_(
    run_id: Annotated[str, typer.Argument(help="MLflow run id of a `raycraft train` run.")],
    dataset: Annotated[Optional[str], typer.Option(
        "--dataset", help="Evaluate on another dataset's test split.")] = None,
    tracking_uri: TrackingOpt = None,
):
    """Reload the model logged by RUN_ID and report its metrics on the test split."""
    from raycraft.evaluate import evaluate_run
    from raycraft.tracking import resolve_tracking_uri

    metrics = evaluate_run(run_id, dataset=dataset, tracking_uri=resolve_tracking_uri(tracking_uri))
    console.print(f"run {run_id} on the test split: {_fmt(metrics)}")


@app.command("runs")
def list_runs(
    experiment: Annotated[Optional[str], typer.Option(help="Only this MLflow experiment's runs.")] = None,
    limit: Annotated[int, typer.Option(help="Newest runs shown.")] = 20,
    tracking_uri: TrackingOpt = None,
):
    """List the newest runs with their status; first marks KILLED any run left RUNNING by a client that died."""
    from raycraft.lifecycle import reap
    from raycraft.tracking import ERROR_TAG, _client, resolve_tracking_uri

    check_count("--limit", limit)
    uri = resolve_tracking_uri(tracking_uri)
    reaped = reap(uri)
    client = _client(uri)
    names = {e.experiment_id: e.name for e in client.search_experiments()}
    if experiment and experiment not in names.values():
        from raycraft.errors import invalid_choice

        raise invalid_choice("--experiment", experiment, names.values())
    ids = [i for i, n in names.items() if experiment in (None, n)]
    table = Table(title=f"raycraft runs in {uri}")
    for col in ("run id", "name", "experiment", "status", "started", "note"):
        table.add_column(col, no_wrap=col in ("run id", "status", "started"))
    for run in client.search_runs(ids, max_results=limit, order_by=["attributes.start_time DESC"]) if ids else []:
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(run.info.start_time / 1000))
        table.add_row(run.info.run_id, run.info.run_name, names[run.info.experiment_id], run.info.status, started,
                      escape(run.data.tags.get(ERROR_TAG, "")[:120]))
    console.print(table)
    if reaped:
        console.print(f"marked KILLED (their client had died): {', '.join(reaped)}")


# Each family's commands live beside its code: a module here adds commands to `app` on import.
COMMAND_MODULES: tuple[str, ...] = (
    "raycraft.rl.commands",
    "raycraft.text.commands",
    "raycraft.generative.commands",
    "raycraft.graph.commands",
    "raycraft.cluster",
    "raycraft.sweep.commands",
)


def _load_commands() -> None:
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(name)


warm_app = typer.Typer(no_args_is_help=True, help="A resident raycraft that commands start from in a fraction "
                                                  "of a second (imports done once).")
app.add_typer(warm_app, name="warm")


@warm_app.command("start")
def warm_start():
    """Start this environment's warm process; until `raycraft warm stop`, every raycraft command of this
    Python environment runs in a fork of it (cold again, with a note, once raycraft's code changes)."""
    from raycraft import warm

    info = warm.start()
    console.print(f"warm raycraft: pid {info['pid']} at {warm.socket_path()}; commands now start from it")


@warm_app.command("stop")
def warm_stop():
    """Stop this environment's warm process; commands it already started finish."""
    from raycraft import warm

    pid = warm.stop()
    console.print(f"warm raycraft: stopped pid {pid}" if pid else "warm raycraft: none was running")


@warm_app.command("status")
def warm_status():
    """Whether a warm process serves this environment, how many commands it ran, and if its code is current."""
    from raycraft import warm

    info = warm.ping()
    if not info:
        console.print("warm raycraft: not running (`raycraft warm start`)")
        return
    state = "current" if info["fresh"] else "stale: raycraft's code changed, commands run cold"
    console.print(f"warm raycraft: pid {info['pid']}, {info['served']} commands served, code {state}")


def main(use_warm: bool = True) -> None:
    """The `raycraft` entry point: in a fork of the warm process if one serves this environment."""
    import os

    if use_warm and sys.argv[1:2] != ["warm"]:
        from raycraft.warm import run_in_warm

        code = run_in_warm(sys.argv[1:])
        if code is not None:
            sys.exit(code)
    from raycraft.errors import Stopped, TrainingError

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    try:
        _load_commands()
        app(standalone_mode=False)
    except UserError as exc:
        err_console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(2)
    except TrainingError as exc:
        err_console.print(f"[red]training failed:[/] {escape(str(exc))}", highlight=False)
        sys.exit(1)
    except Stopped as exc:
        where = f": MLflow run {exc.run_id} is marked KILLED; --resume {exc.run_id} continues it" if exc.run_id else ""
        err_console.print(f"[yellow]{escape(str(exc))}[/]{escape(where)}", highlight=False)
        sys.exit(128 + exc.signum)
    except KeyboardInterrupt:
        sys.exit(128 + signal.SIGINT)
    except Exception as exc:
        if any(cls.__name__ in ("Exit", "Abort") for cls in type(exc).__mro__):  # typer's or its click's
            sys.exit(getattr(exc, "exit_code", 1))
        usage = usage_error(exc)
        if usage is None:
            raise
        err_console.print(usage, highlight=False, markup=False)
        sys.exit(2)


def usage_error(exc: Exception) -> str | None:
    """The two lines to print for a command-line error of typer's click, or None for any other exception.
    Typer ships its own copy of click, so this reads click's documented exception interface
    (`format_message`, `exit_code`, `ctx`) instead of matching exception classes."""
    if not (callable(getattr(exc, "format_message", None)) and isinstance(getattr(exc, "exit_code", None), int)):
        return None
    ctx = getattr(exc, "ctx", None)
    path = getattr(ctx, "command_path", None) or "raycraft"
    message = " ".join(str(exc.format_message()).split())
    value = _given_value(getattr(getattr(exc, "param", None), "opts", None) or [], sys.argv[1:])
    if value is not None and repr(value) not in message:
        message += f" (got {value!r})"
    return f"error: {path}: {message}\nTry '{path} --help' for the options and their choices."


def _given_value(opts: list[str], argv: list[str]) -> str | None:
    """The value typed for one of the option names `opts` (`--seed abc` or `--seed=abc`), if any."""
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name in opts:
            return value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    return None


if __name__ == "__main__":
    # `python -m raycraft.cli`: family modules add their commands to `raycraft.cli.app`, a different module
    # object from this `__main__`, so run that module's main.
    from raycraft.cli import main as package_main

    package_main()
