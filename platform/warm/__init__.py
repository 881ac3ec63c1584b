"""A warm raycraft: one resident process that has already imported torch, Ray Train, MLflow and every
command and model, and forks a child for each `raycraft` command run while it is up.

A cold command spends seconds importing before it does anything (about 2 s for the CLI, 3 s for MLflow,
1 s for Ray Train, 1.5 s for the optimizer's `torch._dynamo`, on 2 cores). A fork of a process that has
done so starts at once. `raycraft warm start` starts it; while it runs, every `raycraft ...` of this
Python environment is sent to it, and the child runs the command exactly as a cold one would: in the
caller's folder and environment, writing to the caller's terminal (the client passes its stdin, stdout and
stderr descriptors over the socket), its exit code returned to the caller, and Ctrl-C forwarded to it.

A fork has the code the warm process imported. When any raycraft source file changed since then (an
editable install being edited), the warm process declines and the command runs cold, with a note.

Protocol, over a Unix socket only this user can open: the client sends one JSON line (argv, cwd, env, its
pid) with its three descriptors; the warm process answers {"pid": child} then {"exit": code} when the
command ends, or {"cold": reason}. {"ping": true} asks for {"pid", "served", "fresh"}.

This module is the client, which every `raycraft` command runs first: the standard library only. The warm
process itself is `raycraft.warm.server`; its commands (`raycraft warm start|stop|status`) are
`raycraft.warm.commands`.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sys
from pathlib import Path


def warm_dir() -> Path:
    return Path(os.environ.get("RAYCRAFT_WARM_DIR") or Path.home() / ".cache" / "raycraft")


def socket_path() -> Path:
    """One warm process per Python environment (its imports are that environment's)."""
    return warm_dir() / f"warm-{hashlib.sha1(sys.prefix.encode()).hexdigest()[:12]}.sock"


def send(conn: socket.socket, message: dict) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


def receive(conn: socket.socket) -> tuple[dict, list[int]]:
    """One JSON line and the descriptors sent with it."""
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    while data and not data.endswith(b"\n"):
        more = conn.recv(1 << 16)
        if not more:
            break
        data += more
    return json.loads(data or b"{}"), fds


def ask(message: dict, fds: list[int] = (), timeout: float | None = 5.0) -> tuple[socket.socket, object] | None:
    """Connect and send `message` (with `fds`); the connection and a line reader, or None if none is up."""
    path = socket_path()
    if not path.exists():
        return None
    conn = socket.socket(socket.AF_UNIX)
    conn.settimeout(timeout)
    try:
        conn.connect(str(path))
        socket.send_fds(conn, [json.dumps(message).encode() + b"\n"], list(fds))
    except OSError:  # a socket file left by a warm process that died
        conn.close()
        return None
    return conn, conn.makefile("r")


def ping() -> dict | None:
    asked = ask({"ping": True})
    if not asked:
        return None
    conn, lines = asked
    with conn:
        try:
            return json.loads(lines.readline() or "null")
        except (OSError, ValueError):
            return None


def run_in_warm(argv: list[str]) -> int | None:
    """Run `raycraft argv` in a fork of the warm process; its exit code, or None to run cold here."""
    if not socket_path().exists():  # the usual case: no warm process, and nothing imported to learn that
        return None
    try:
        asked = ask({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "pid": os.getpid()}, [0, 1, 2],
                    timeout=None)
    except OSError:  # a descriptor of ours is closed
        return None
    if not asked:
        return None
    conn, lines = asked
    with conn:
        first = json.loads(lines.readline() or '{"cold": "the warm process closed the connection"}')
        if "cold" in first:
            print(f"raycraft warm: {first['cold']}; running cold.", file=sys.stderr)
            return None
        pid = first["pid"]
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: os.kill(pid, signum))
        last = lines.readline()
        return int(json.loads(last)["exit"]) if last else 1
