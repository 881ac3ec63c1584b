"""`raycraft warm start|stop|status`."""

from __future__ import annotations

import typer

from raycraft.console import console
from raycraft.warm import ping, server, socket_path

# What the warm process runs first: the command line's own preparation. Named, not imported: the command
# line is the layer above this one.
ENTRY = "raycraft.cli:warm_entry"

app = typer.Typer()
warm_app = typer.Typer(no_args_is_help=True, help="A resident raycraft that commands start from in a fraction "
                                                  "of a second (imports done once).")
app.add_typer(warm_app, name="warm")


@warm_app.command("start")
def warm_start():
    """Start this environment's warm process; until `raycraft warm stop`, every raycraft command of this
    Python environment runs in a fork of it (cold again, with a note, once raycraft's code changes)."""
    info = server.start(ENTRY)
    console.print(f"warm raycraft: pid {info['pid']} at {socket_path()}; commands now start from it")


@warm_app.command("stop")
def warm_stop():
    """Stop this environment's warm process; commands it already started finish."""
    pid = server.stop()
    console.print(f"warm raycraft: stopped pid {pid}" if pid else "warm raycraft: none was running")


@warm_app.command("status")
def warm_status():
    """Whether a warm process serves this environment, how many commands it ran, and if its code is current."""
    info = ping()
    if not info:
        console.print("warm raycraft: not running (`raycraft warm start`)")
        return
    state = "current" if info["fresh"] else "stale: raycraft's code changed, commands run cold"
    console.print(f"warm raycraft: pid {info['pid']}, {info['served']} commands served, code {state}")
