"""The `raycraft` command line. Bad input exits with code 2 and a one-paragraph message, no traceback.

The root command knows every command's name, module and one-line help without importing the module: the core
commands from the tables below, each family's from its `registry.register_family(..., commands=...)` line.
Running a command imports its module only (after checking the raycraft extra the module needs), so
`raycraft --help` and `raycraft models` pay for none of torch, Ray or MLflow. Each command module defines its
own typer `app`; none imports this one.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import os
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Optional

import typer
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from raycraft import noise, registry, warm
from raycraft.console import Invocation, console, err_console
from raycraft.errors import Stopped, TrainingError, UserError
from raycraft.extras import require_extra


@dataclass(frozen=True)
class Entry:
    """Where a command lives, and what `raycraft --help` says of it (a test checks it against the command)."""

    module: str
    help: str
    extra: str | None = None
    """The raycraft extra the module needs, checked before it is imported."""


# The core commands, in the order `raycraft --help` lists them; the families' commands come between the two.
TRAINING = {
    "models": Entry("raycraft.commands.catalog",
                    "List every registered model with its family and a one-line description."),
    "datasets": Entry("raycraft.commands.catalog",
                      "List every registered dataset with its task and a one-line description."),
    "train": Entry("raycraft.commands.train",
                   "Train MODEL on --dataset with Ray Train, logging to MLflow; prints the run id and final metrics."),
    "eval": Entry("raycraft.commands.train",
                  "Reload the model logged by RUN_ID and report its metrics on the test split."),
    "runs": Entry("raycraft.commands.runs", "List the newest runs (status, model, key metrics, duration), marking "
                                            "KILLED those whose client died; `runs compare` puts runs side by side."),
}
OPERATIONS = {
    "submit": Entry("raycraft.cluster_commands",
                    "Run a raycraft command on a Ray cluster: `raycraft submit [--address URL] -- train lenet5 ...`."),
    "tune": Entry("raycraft.sweep.commands", "Search hyperparameters of a train or rl job with Ray Tune; one MLflow "
                                             "parent run, a child run per trial."),
    "scaling": Entry("raycraft.sweep.commands", "Train model sizes x data amounts (or IsoFLOP budgets) as Tune "
                                                "trials; fit the laws, predict the held-out runs."),
    "warm": Entry("raycraft.warm.commands",
                  "A resident raycraft that commands start from in a fraction of a second (imports done once)."),
    "jobs": Entry("raycraft.cluster_commands", "Jobs on a Ray cluster: list, logs, stop."),
}


def command_table() -> dict[str, Entry]:
    """Every command of the command line by name, in the order of `raycraft --help`."""
    families = {name: Entry(f"{spec.package}.commands", help, spec.extra)
                for spec in registry.families().values() for name, help in spec.commands.items()}
    return {**TRAINING, **families, **OPERATIONS}


@functools.cache
def module_commands(module: str) -> dict[str, TyperCommand | TyperGroup]:
    """The commands of a command module's `app`, built once per process (the warm process builds them all)."""
    return typer.main.get_group(importlib.import_module(module).app).commands


_LISTING = "raycraft.listing"  # a ctx.meta key: set while the root's help is formatted


class LazyGroup(TyperGroup):
    """The root command. Its `commands` are help-only stand-ins, what the help lists and a typo's suggestions
    come from; `get_command` imports the real one, except while the help is being formatted."""

    def __init__(self, **attrs) -> None:
        super().__init__(**attrs)
        self.entries = command_table()
        self.commands = {name: TyperCommand(name=name, help=entry.help) for name, entry in self.entries.items()}

    def get_command(self, ctx: typer.Context, cmd_name: str) -> TyperCommand | TyperGroup | None:
        entry = self.entries.get(cmd_name)
        if entry is None or ctx.meta.get(_LISTING):
            return super().get_command(ctx, cmd_name)
        if entry.extra:
            require_extra(entry.extra, f"raycraft {cmd_name}")
        return module_commands(entry.module)[cmd_name]

    def format_help(self, ctx: typer.Context, formatter) -> None:
        with listing(ctx):
            super().format_help(ctx, formatter)

    def shell_complete(self, ctx: typer.Context, incomplete: str) -> list:
        """The completions of a word after `raycraft`: the commands' names (with their help), from the stand-ins,
        so that pressing Tab imports none of them."""
        with listing(ctx):
            return super().shell_complete(ctx, incomplete)


@contextlib.contextmanager
def listing(ctx: typer.Context) -> Iterator[None]:
    """While entered, the root's `get_command` answers with the help-only stand-ins."""
    ctx.meta[_LISTING] = True
    try:
        yield
    finally:
        del ctx.meta[_LISTING]


# add_completion: --install-completion and --show-completion, for the shell typer detects (bash, zsh, fish, ...)
app = typer.Typer(cls=LazyGroup, no_args_is_help=True, pretty_exceptions_enable=False)


def show_version(value: bool) -> None:
    """`--version`: raycraft's version and those of the libraries a bug report needs, read from the installed
    packages' metadata (nothing imported)."""
    if not value:
        return
    python = ".".join(map(str, sys.version_info[:3]))
    libraries = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in VERSIONED)
    console.print(f"raycraft {importlib.metadata.version('raycraft')} (Python {python}; {libraries})", highlight=False)
    raise typer.Exit()


VERSIONED = ("ray", "torch", "mlflow", "typer")  # the libraries `--version` names


@app.callback()
def raycraft(
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Also show the warnings and log lines of Ray, RLlib, gymnasium and MLflow that "
                                "raycraft hides as noise (`raycraft --verbose rl ...`).")] = False,
    version: Annotated[Optional[bool], typer.Option(
        "--version", callback=show_version, is_eager=True, help="Print the versions of raycraft, Python, Ray, "
                                                                "torch, MLflow and typer, and exit.")] = None,
) -> None:
    """Train the survey's model families on Ray, tracked in MLflow."""
    if not verbose:
        noise.quiet()


def main(use_warm: bool = True, started_at: float | None = None) -> None:
    """The `raycraft` entry point: in a fork of the warm process if one serves this environment. `started_at`:
    when the user's command began, if before this process (a warm fork's caller)."""
    if use_warm and sys.argv[1:2] != ["warm"]:
        code = warm.run_in_warm(sys.argv[1:])
        if code is not None:
            sys.exit(code)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        app(standalone_mode=False, obj=Invocation(started_at))
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


def warm_entry() -> Callable[[float], None]:
    """The warm process's first call (`raycraft warm start` names it): imports every command module whose extra
    is installed, so that forks find them imported, and returns what each fork runs."""
    for entry in command_table().values():
        with contextlib.suppress(UserError):  # its extra is missing: its commands only name the pip line
            if entry.extra:
                require_extra(entry.extra, "")
            module_commands(entry.module)
    return lambda started_at: main(use_warm=False, started_at=started_at)


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
    main()
