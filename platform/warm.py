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

Protocol, over a Unix socket only this user can open: the client sends one JSON line (argv, cwd, env,
started_at) with its three descriptors; the warm process answers {"pid": child} then {"exit": code} when
the command ends, or {"cold": reason}. {"ping": true} asks for {"pid", "served", "fresh"}.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from raycraft.lifecycle import process_start_time

client_started_at: float | None = None
"""In a warm child: when the caller's process started (the command's own start, for `startup_s`)."""

PRELOAD = ("torch._dynamo", "mlflow", "mlflow.pytorch", "ray.train.torch", "raycraft.runner", "raycraft.train.loop",
           "raycraft.evaluate", "raycraft.plots")


def warm_dir() -> Path:
    return Path(os.environ.get("RAYCRAFT_WARM_DIR") or Path.home() / ".cache" / "raycraft")


def socket_path() -> Path:
    """One warm process per Python environment (its imports are that environment's)."""
    return warm_dir() / f"warm-{hashlib.sha1(sys.prefix.encode()).hexdigest()[:12]}.sock"


def source_dirs() -> list[Path]:
    import raycraft
    import raycraft.envs
    import raycraft.models

    return sorted({Path(p) for pkg in (raycraft, raycraft.models, raycraft.envs) for p in pkg.__path__})


def code_snapshot(dirs: list[Path]) -> dict[str, float]:
    """Modification times of every Python file (and folder, for added files) under `dirs`."""
    stamps = {}
    for root in dirs:
        for folder, subdirs, files in os.walk(root):
            subdirs[:] = [d for d in subdirs if d != "__pycache__"]
            stamps[folder] = os.stat(folder).st_mtime
            stamps.update({f"{folder}/{f}": os.stat(f"{folder}/{f}").st_mtime for f in files if f.endswith(".py")})
    return stamps


def _send(conn: socket.socket, message: dict) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
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
        asked = ask({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ),
                     "started_at": process_start_time()}, [0, 1, 2], timeout=None)
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


def serve(path: Path) -> None:
    """The warm process: import everything, then fork a child per command until SIGTERM."""
    import importlib

    from raycraft import cli

    cli._load_commands()
    for name in PRELOAD:
        importlib.import_module(name)
    from raycraft.registry import datasets, models

    models(), datasets()
    dirs = source_dirs()
    snapshot = code_snapshot(dirs)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    staging = path.with_suffix(".new")
    staging.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX)
    old_umask = os.umask(0o077)  # only this user may connect: a connection runs commands as this user
    try:
        server.bind(str(staging))
    finally:
        os.umask(old_umask)
    server.listen(16)
    staging.rename(path)
    served = 0

    def on_sigterm(signum, frame):
        path.unlink(missing_ok=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    print(f"warm: pid {os.getpid()} serving {path}", flush=True)
    server.settimeout(1.0)
    while True:
        _reap()
        try:
            conn, _ = server.accept()
        except TimeoutError:
            continue
        conn.settimeout(5.0)  # a connection that never sends must not hold the warm process
        try:
            request, fds = _receive(conn)
        except (OSError, ValueError):
            conn.close()
            continue
        conn.settimeout(None)
        fresh = code_snapshot(dirs) == snapshot
        if request.get("ping"):
            _send(conn, {"pid": os.getpid(), "served": served, "fresh": fresh})
        elif not fresh:
            _send(conn, {"cold": "raycraft's code changed since it started (`raycraft warm start` again)"})
        elif len(fds) != 3:
            _send(conn, {"cold": "the command's terminal descriptors did not arrive"})
        else:
            served += 1
            if os.fork() == 0:
                server.close()
                _child(conn, request, fds)
        for fd in fds:
            os.close(fd)
        conn.close()


def _reap() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def _child(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """Become the caller's command: its descriptors, folder, environment and argv; report the exit code."""
    global client_started_at

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for target, fd in zip((0, 1, 2), fds, strict=True):
        os.dup2(fd, target)
        os.close(fd)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    client_started_at = request["started_at"]
    sys.argv = ["raycraft", *request["argv"]]
    _send(conn, {"pid": os.getpid()})
    import atexit

    from raycraft import cli

    for console, kwargs in zip((cli.console, cli.err_console), cli.CONSOLE_ARGS, strict=True):
        console.__init__(**kwargs)  # re-detect the caller's terminal (colour, width) in place
    outcome = {"code": 1}

    def report_exit() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        _send(conn, {"exit": outcome["code"]})

    atexit.register(report_exit)  # runs after the handlers the command registers, such as Ray's shutdown
    try:
        cli.main(use_warm=False)
        outcome["code"] = 0
    except SystemExit as exc:
        outcome["code"] = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
    sys.exit(outcome["code"])


def start(timeout: float = 180.0) -> dict:
    """Start the warm process for this environment (unless a current one answers) and wait until it serves."""
    import subprocess

    running = ping()
    if running and running["fresh"]:
        return running
    if running:  # its code is stale: replace it
        stop()
    path = socket_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.unlink(missing_ok=True)
    log = path.with_suffix(".log")
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "raycraft.warm", str(path)], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the warm process exited with code {proc.returncode}; see {log}")
        answer = ping()
        if answer:
            return answer
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError(f"the warm process did not start within {timeout:.0f} s; see {log}")


def stop(timeout: float = 30.0) -> int | None:
    """End this environment's warm process (its pid, never a name); the pid it had, or None if none ran.
    Commands it already forked finish on their own."""
    running = ping()
    if not running:
        socket_path().unlink(missing_ok=True)
        return None
    pid = running["pid"]
    os.kill(pid, signal.SIGTERM)
    deadline = time.time() + timeout
    while time.time() < deadline and _alive(pid):
        time.sleep(0.1)
    return pid


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


if __name__ == "__main__":
    from raycraft.warm import serve as package_serve  # the `raycraft.warm` module the children use

    package_serve(Path(sys.argv[1]))
