"""`raycraft runs`: the newest runs of the MLflow store, after marking KILLED the runs whose client died."""

from __future__ import annotations

import time
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from raycraft import tracking
from raycraft.console import TrackingOpt, console
from raycraft.errors import check_count, invalid_choice

app = typer.Typer()


@app.command("runs")
def list_runs(
    experiment: Annotated[Optional[str], typer.Option(help="Only this MLflow experiment's runs.")] = None,
    limit: Annotated[int, typer.Option(help="Newest runs shown.")] = 20,
    tracking_uri: TrackingOpt = None,
):
    """List the newest runs with their status; first marks KILLED any run left RUNNING by a client that died."""
    check_count("--limit", limit)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    reaped = tracking.reap(uri)
    names = tracking.experiments(uri)
    if experiment and experiment not in names.values():
        raise invalid_choice("--experiment", experiment, names.values())
    table = Table(title=f"raycraft runs in {uri}")
    for col in ("run id", "name", "experiment", "status", "started", "note"):
        table.add_column(col, no_wrap=col in ("run id", "status", "started"))
    for run in tracking.search_runs(uri, experiment, max_results=limit, newest_first=True):
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(run.info.start_time / 1000))
        table.add_row(run.info.run_id, run.info.run_name, names[run.info.experiment_id], run.info.status, started,
                      escape(run.data.tags.get(tracking.ERROR_TAG, "")[:120]))
    console.print(table)
    if reaped:
        console.print(f"marked KILLED (their client had died): {', '.join(reaped)}")
