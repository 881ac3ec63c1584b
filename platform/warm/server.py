"""The warm process (see `raycraft.warm`): imports everything once, then forks a child per command, which
becomes the caller's command and reports its exit code. Also starting and stopping that process.

It runs the command line without importing it: `start(entry)` names the function ("module:function") that
the new process calls first; that function imports the command modules and returns what each fork runs."""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import psutil

from raycraft.console import redetect_terminal
from raycraft.registry import datasets, models
from raycraft.warm import ping, receive, send, socket_path

PRELOAD = ("torch._dynamo", "mlflow", "mlflow.pytorch", "ray.train.torch", "raycraft.runner",
           "raycraft.train.worker", "raycraft.evaluate", "raycraft.plots")
Run = Callable[[float], None]
"""What a fork runs: the command line, given when its caller started."""


def source_dirs() -> list[Path]:
    """raycraft's source folders, found without importing them (`raycraft.envs` needs the `rl` extra)."""
    specs = (importlib.util.find_spec(name) for name in ("raycraft", "raycraft.models", "raycraft.envs"))
    return sorted({Path(p) for spec in specs if spec for p in spec.submodule_search_locations})


def code_snapshot(dirs: list[Path]) -> dict[str, float]:
    """Modification times of every Python file (and folder, for added files) under `dirs`."""
    stamps = {}
    for root in dirs:
        for folder, subdirs, files in os.walk(root):
            subdirs[:] = [d for d in subdirs if d != "__pycache__"]
            stamps[folder] = os.stat(folder).st_mtime
            stamps.update({f"{folder}/{f}": os.stat(f"{folder}/{f}").st_mtime for f in files if f.endswith(".py")})
    return stamps


def main(entry: str, path: str) -> None:
    """The warm process: `entry` prepares the command line, then the heavy libraries and the registries are
    imported, then it serves `path` until SIGTERM."""
    module, _, name = entry.partition(":")
    run = getattr(importlib.import_module(module), name)()
    for heavy in PRELOAD:
        importlib.import_module(heavy)
    models(), datasets()
    Server(Path(path), run).serve()


class Server:
    """One listening socket; a fork per command while raycraft's code is the code it imported."""

    def __init__(self, path: Path, run: Run) -> None:
        self.path, self.run, self.served = path, run, 0
        self.dirs = source_dirs()
        self.snapshot = code_snapshot(self.dirs)

    def listen(self) -> socket.socket:
        """Bind where clients look, atomically: a client never finds a socket that does not answer yet."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        staging = self.path.with_suffix(".new")
        staging.unlink(missing_ok=True)
        server = socket.socket(socket.AF_UNIX)
        old_umask = os.umask(0o077)  # only this user may connect: a connection runs commands as this user
        try:
            server.bind(str(staging))
        finally:
            os.umask(old_umask)
        server.listen(16)
        staging.rename(self.path)
        return server

    def serve(self) -> None:
        server = self.listen()

        def on_sigterm(signum, frame):
            self.path.unlink(missing_ok=True)
            sys.exit(0)

        signal.signal(signal.SIGTERM, on_sigterm)
        print(f"warm: pid {os.getpid()} serving {self.path}", flush=True)
        server.settimeout(1.0)
        while True:
            _reap()
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conn.settimeout(5.0)  # a connection that never sends must not hold the warm process
            try:
                request, fds = receive(conn)
            except (OSError, ValueError):
                conn.close()
                continue
            conn.settimeout(None)
            self.answer(server, conn, request, fds)
            for fd in fds:
                os.close(fd)
            conn.close()

    def answer(self, server: socket.socket, conn: socket.socket, request: dict, fds: list[int]) -> None:
        """A ping's answer, a refusal (the command then runs cold), or a fork that runs the command."""
        fresh = code_snapshot(self.dirs) == self.snapshot
        if request.get("ping"):
            send(conn, {"pid": os.getpid(), "served": self.served, "fresh": fresh})
        elif not fresh:
            send(conn, {"cold": "raycraft's code changed since it started (`raycraft warm start` again)"})
        elif len(fds) != 3:
            send(conn, {"cold": "the command's terminal descriptors did not arrive"})
        else:
            self.served += 1
            if os.fork() == 0:
                server.close()
                _child(conn, request, fds, self.run)


def _reap() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def _child(conn: socket.socket, request: dict, fds: list[int], run: Run) -> None:
    """Become the caller's command: its descriptors, folder, environment and argv; report the exit code."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for target, fd in zip((0, 1, 2), fds, strict=True):
        os.dup2(fd, target)
        os.close(fd)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = ["raycraft", *request["argv"]]
    started_at = _started(request["pid"])
    send(conn, {"pid": os.getpid()})
    redetect_terminal()
    outcome = {"code": 1}

    def report_exit() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        send(conn, {"exit": outcome["code"]})

    atexit.register(report_exit)  # runs after the handlers the command registers, such as Ray's shutdown
    try:
        run(started_at)
        outcome["code"] = 0
    except SystemExit as exc:
        outcome["code"] = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    sys.exit(outcome["code"])


def _started(pid: int) -> float:
    """When the caller's process started: the command's own start, for its `startup_s`."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:  # the caller is gone already
        return time.time()


def start(entry: str, timeout: float = 180.0) -> dict:
    """Start the warm process for this environment (unless a current one answers) and wait until it serves;
    `entry` ("module:function") prepares the command line in it (`main`)."""
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
        proc = subprocess.Popen([sys.executable, "-m", "raycraft.warm", entry, str(path)], stdin=subprocess.DEVNULL,
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
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
