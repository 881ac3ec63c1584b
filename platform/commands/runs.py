"""`raycraft runs`: the runs of the MLflow store, newest first, after marking KILLED the runs whose client died;
`raycraft runs compare`: runs side by side. `--json` prints the same as JSON on stdout, for scripts."""

from __future__ import annotations

import json
import math
import sys
import time
from datetime import datetime, timezone
from typing import Annotated, Any, Optional

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from raycraft import tracking
from raycraft.console import TrackingOpt, console, err_console, format_metrics, format_number
from raycraft.errors import UserError, check_count, invalid_choice

app = typer.Typer()
runs_app = typer.Typer()
app.add_typer(runs_app, name="runs")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout (nothing else) instead of a table.")]
KEY_METRICS = ("test_", "best_", "eval_return_mean", "return_mean")
"""The metrics a listing shows of a run (prefixes or names): a training's test figures, a sweep's best trial's,
an RL run's returns. A run with none of them (one still training, or stopped) shows its `val_` ones."""
MODEL_PARAMS = ("model", "algo", "job.model")  # the first given names a run's model (a sweep's: its job's)
DATA_PARAMS = ("dataset", "env", "job.dataset", "job.env")
MIN_WIDTH = {"key metrics": 14, "started": 10, "duration": 8}  # a figure, a date, "59m 59s" on one line
CELL = 60  # characters of a param's value shown in a table cell (--json has them whole)


@runs_app.callback(invoke_without_command=True)
def list_runs(
    ctx: typer.Context,
    experiment: Annotated[Optional[str], typer.Option(help="Only this MLflow experiment's runs.")] = None,
    limit: Annotated[int, typer.Option(help="Newest runs shown.")] = 20,
    json_: JsonOpt = False,
    tracking_uri: TrackingOpt = None,
):
    """List the newest runs (status, model, key metrics, duration), marking KILLED those whose client died;
    `runs compare` puts runs side by side."""
    if ctx.invoked_subcommand:
        return
    check_count("--limit", limit)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    reaped = tracking.reap(uri)
    names = tracking.experiments(uri)
    if experiment and experiment not in names.values():
        raise invalid_choice("--experiment", experiment, names.values())
    rows = [summary(run, names) for run in tracking.search_runs(uri, experiment, max_results=limit,
                                                                 newest_first=True)]
    if reaped:
        (err_console if json_ else console).print(f"marked KILLED (their client had died): {', '.join(reaped)}")
    if json_:
        print_json(rows)
        return
    table = Table(title=escape(f"raycraft runs in {uri}" + (f", experiment {experiment}" if experiment else "")),
                  box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    several = len({row["experiment"] for row in rows}) > 1
    columns = ["run id", *(["experiment"] if several else []), "status", "model", "data", "key metrics", "started",
               "duration", *(["note"] if any(row["note"] for row in rows) else [])]
    for col in columns:  # a narrow terminal wraps a cell (folds a long word) rather than cut it
        table.add_column(col, no_wrap=col in ("run id", "status"), overflow="fold", min_width=MIN_WIDTH.get(col))
    for row in rows:
        cells = {**row, "run id": row["run_id"], "data": row["dataset"], "started": local_time(row["start"]),
                 "key metrics": "\n".join(format_metrics({k: v}) for k, v in row["metrics"].items()),
                 "duration": format_duration(row["duration_s"]), "note": row["note"][:120]}
        table.add_row(*(escape(str(cells[col] or "")) for col in columns))
    console.print(table)


@runs_app.command("compare")
def compare(
    run_ids: Annotated[list[str], typer.Argument(help="Two or more MLflow run ids.", metavar="run_id")],
    json_: JsonOpt = False,
    tracking_uri: TrackingOpt = None,
):
    """Show runs side by side: the params that differ between them and their final metrics."""
    if len(run_ids) < 2:
        raise UserError(f"RUN_ID: compare takes two or more run ids, got {len(run_ids)}.")
    uri = tracking.resolve_tracking_uri(tracking_uri)
    runs = [tracking.get_run(uri, run_id) for run_id in run_ids]
    names = tracking.experiments(uri)
    params = side_by_side([run.data.params for run in runs])
    differ = {k: values for k, values in params.items() if len(set(values)) > 1}
    metrics = side_by_side([run.data.metrics for run in runs])
    rows = [summary(run, names) for run in runs]
    if json_:
        print_json({"runs": rows, "params": differ, "metrics": metrics})
        return
    table = Table(title=f"{len(runs)} runs: {len(differ)} of {len(params)} params differ",
                  caption="A param that a run lacks, or a metric it never logged, shows as -.")
    table.add_column("", no_wrap=True)
    for run in runs:
        table.add_column(escape(f"{run.info.run_name}\n{run.info.run_id[:8]}"))
    for key in ("status", "model", "dataset", "experiment"):
        table.add_row(key, *(escape(str(row[key] or "-")) for row in rows))
    table.add_row("started", *(local_time(row["start"]) for row in rows))
    table.add_row("duration", *(format_duration(row["duration_s"]) for row in rows), end_section=True)
    for key, values in differ.items():
        table.add_row(escape(key), *(escape("-" if v is None else v[:CELL]) for v in values))
    table.add_section()
    for key, values in metrics.items():
        table.add_row(escape(key), *("-" if v is None else format_number(v) for v in values))
    console.print(table)


def summary(run: Any, experiments: dict[str, str]) -> dict[str, Any]:
    """What a listing shows of one run, as plain data (the JSON of `--json`)."""
    info, params, metrics = run.info, run.data.params, run.data.metrics
    ended = info.end_time if info.end_time else time.time() * 1000
    key = {k: v for k, v in metrics.items() if k.startswith(KEY_METRICS) or k in KEY_METRICS}
    return {"run_id": info.run_id, "name": info.run_name, "experiment": experiments.get(info.experiment_id),
            "status": info.status, "model": first_param(params, MODEL_PARAMS),
            "dataset": first_param(params, DATA_PARAMS),
            "metrics": dict(sorted((key or {k: v for k, v in metrics.items() if k.startswith("val_")}).items())),
            "start": datetime.fromtimestamp(info.start_time / 1000, timezone.utc).isoformat(timespec="seconds"),
            "duration_s": round((ended - info.start_time) / 1000, 1),
            "parent_run_id": run.data.tags.get(tracking.PARENT_TAG),
            "note": run.data.tags.get(tracking.ERROR_TAG, "")}


def first_param(params: dict[str, str], names: tuple[str, ...]) -> str | None:
    return next((params[name] for name in names if params.get(name)), None)


def side_by_side(records: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """{key: [each record's value, None where it has none]} over every key of `records`, sorted by key."""
    return {key: [record.get(key) for record in records] for key in sorted(set().union(*records))}


def local_time(iso: str) -> str:
    """A summary's start time (ISO 8601, UTC) as the local minute it was: 2026-12-07 01:50."""
    return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M")


def format_duration(seconds: float) -> str:
    """45s, 12m 05s, 3h 02m."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    return f"{s // 60}m {s % 60:02d}s" if s < 3600 else f"{s // 3600}h {s % 3600 // 60:02d}m"


def finite(data: Any) -> Any:
    """`data` with NaN and infinite floats (a diverged run's metrics) as None, which JSON can hold."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(v) for v in data]
    return data


def print_json(data: Any) -> None:
    """`data` as strict JSON on stdout (non-finite numbers as null), alone: no colour, no wrapping."""
    sys.stdout.write(json.dumps(finite(data), indent=2, allow_nan=False) + "\n")
