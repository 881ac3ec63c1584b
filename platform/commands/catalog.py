"""`raycraft models` and `raycraft datasets`: what can be trained on what. The registry only, so they answer
without importing torch, Ray or MLflow."""

from __future__ import annotations

import json
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from raycraft.config import documented_keys, to_dict
from raycraft.console import console
from raycraft.registry import datasets, model_spec, models

app = typer.Typer()


@app.command("models")
def list_models(details: Annotated[Optional[str], typer.Option(help="Show one model's config keys.")] = None):
    """List every registered model with its family and a one-line description."""
    if details:
        show_config(details)
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


def show_config(name: str) -> None:
    """Model `name`'s config keys as `--set` takes them (a nested config's as `moe.experts`), each with its
    default, its choices where they are enumerated, and its meaning."""
    spec = model_spec(name)
    keys = documented_keys(spec.config_cls)
    table = Table(title=escape(f"{spec.name} ({spec.family}, {spec.task}): {spec.description}"))
    columns = ("key", "default", "choices", "meaning") if any(k.choices for k in keys) else (
        "key", "default", "meaning")
    for col in columns:
        table.add_column(col, no_wrap=col == "key")
    for k in keys:
        cells = {"key": k.key, "default": "" if k.group else as_yaml(k.default),
                 "choices": ", ".join(as_yaml(c) for c in k.choices), "meaning": k.help}
        table.add_row(*(escape(cells[col]) for col in columns), style="bold" if k.group else None)
    console.print(table)


def as_yaml(value: Any) -> str:
    """A value as `--set key=VALUE` and a YAML config take it: `pre`, `true`, `null`, `[256, 256]`."""
    return value if isinstance(value, str) and value else json.dumps(to_dict(value))
