"""The terminal side every command shares: two rich consoles (results on stdout, messages and progress on
stderr), a progress bar, the typer option types several commands declare alike, and what the entry point
tells a command about its invocation. Light on purpose: the command line imports it before anything heavy."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from raycraft.config import field_at

CONSOLE_ARGS = ({"soft_wrap": True}, {"stderr": True, "soft_wrap": True})
console, err_console = (Console(**kwargs) for kwargs in CONSOLE_ARGS)

SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key: key=value (repeatable).")]
TrackingOpt = Annotated[Optional[str], typer.Option(
    "--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here).")]
AddressOpt = Annotated[Optional[str], typer.Option(
    "--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a private local Ray).")]


def field_option(cls: type, key: str, *names: str) -> Any:
    """The annotation of a command's option that sets field `key` (dotted: `data.data_dir`) of config
    dataclass `cls`, with the field's type and, as its help, the field's documentation, so neither is written
    twice. Its default is None: a flag not given leaves the key to the config's other layers. `names`: the
    option's names (typer's default: the parameter's name, dashed)."""
    field, tp = field_at(cls, key)
    return Annotated[Optional[tp], typer.Option(*names, help=field.metadata["help"])]


@dataclass(frozen=True)
class Invocation:
    """What the entry point passes a command as typer's `ctx.obj`."""

    started_at: float | None = None
    """When the user's command began, if before this process did (a warm fork runs for a caller that started
    earlier); None: when this process started."""


def redetect_terminal() -> None:
    """Re-detect the terminal (colour, width) in place: a warm fork writes to its caller's terminal, not to the
    one its parent started with, and every module holds these two console objects."""
    for each, kwargs in zip((console, err_console), CONSOLE_ARGS, strict=True):
        each.__init__(**kwargs)


@contextlib.contextmanager
def progress_bar(label: str, total: int, show: bool = True) -> Iterator[Callable[[int], None] | None]:
    """A progress bar on stderr, so stdout keeps only the command's output; yields `advance(n done)`, or
    None (and shows nothing) unless `show`."""
    if not show:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)
