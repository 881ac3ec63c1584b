"""`raycraft models` and `raycraft datasets`: what can be trained on what. The registry only, so they answer
without importing torch, Ray or MLflow."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from raycraft.console import console
from raycraft.registry import config_fields, datasets, model_spec, models

app = typer.Typer()


@app.command("models")
def list_models(details: Annotated[Optional[str], typer.Option(help="Show one model's config keys.")] = None):
    """List every registered model with its family and a one-line description."""
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
    table = Table(title="raycraft datasets")
    for col in ("name", "task", "needs --data-dir", "description"):
        table.add_column(col)
    for spec in datasets().values():
        table.add_row(spec.name, spec.task, "yes" if spec.needs_data_dir else "", spec.description)
    console.print(table)
