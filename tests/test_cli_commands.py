"""The command line's lazy root: it lists every command, with the help the command itself gives, without
importing any command module; the help it declares for a command cannot drift from the command's own."""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys

import typer.main

from raycraft.cli import command_table


def shown_help(command) -> str:
    """What a list of commands shows of one command's help: its first paragraph, on one line (typer's rule;
    every raycraft command's is its docstring's or typer help's first line)."""
    return " ".join(inspect.cleandoc(command.help or "").split("\n\n")[0].split())


def test_declared_help_is_each_commands_own():
    """Every command a command module defines is declared in the table, with the help line it gives itself."""
    table = command_table()
    defined = {}
    for module in {entry.module for entry in table.values()}:
        commands = typer.main.get_group(importlib.import_module(module).app).commands
        defined.update({name: (module, command) for name, command in commands.items()})
    assert sorted(defined) == sorted(table)
    for name, entry in table.items():
        module, command = defined[name]
        assert module == entry.module, name
        assert entry.help == shown_help(command), name


def test_help_lists_every_command_and_imports_none(tmp_path):
    """`raycraft --help` through the entry point: one row per command, in the table's order, with its help;
    no command module (and none of torch, Ray, MLflow) imported."""
    probe = ("import atexit, sys\n"
             "atexit.register(lambda: print('MODULES', ' '.join(sorted(sys.modules))))\n"
             "sys.argv = ['raycraft', '--help']\n"
             "from raycraft.cli import main\n"
             "main()\n")
    env = {**os.environ, "COLUMNS": "400", "TERMINAL_WIDTH": "400"}  # wide: one line per command
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    text, modules = out.stdout.split("MODULES", 1)
    loaded = set(modules.split())
    table = command_table()
    assert not {entry.module for entry in table.values()} & loaded
    for heavy in ("torch", "ray", "mlflow", "psutil"):
        assert heavy not in loaded, heavy
    panel = text.split("Commands", 1)[1].splitlines()[1:]
    rows = [line.strip("│ ").split(None, 1) for line in panel if line.startswith("│")]
    assert [name for name, _ in rows] == list(table)
    assert [" ".join(help.split()) for _, help in rows] == [entry.help for entry in table.values()]
