"""Signals while a raycraft process works on a run: they end it truthfully, not as a training failure.

- `stop_on_signals`: SIGTERM and SIGINT raise `Stopped`, so the code that owns the run ends it KILLED with
  the signal named, instead of leaving it RUNNING (SIGTERM's default) or calling it a training failure.
- `watched`: work that waits on Ray runs in a thread, so that a signal's `Stopped` reaches the main thread.
- `ended_by`: the MLflow status and reason an exception means. Who holds a run, and the runs whose holder
  died, are `raycraft.tracking`'s (`Heartbeat`, `reap`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import psutil

from raycraft.errors import Stopped

T = TypeVar("T")


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise `Stopped` in the main thread (elsewhere, e.g. in a Tune trial, a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame) -> None:
        _received.append(signum)
        raise Stopped(signum)

    _received.clear()
    before = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h)


_received: list[int] = []  # signals `stop_on_signals` caught: Ray may swallow the exception its handler raised


def process_start_time() -> float:
    """When this process started, in seconds since the epoch (the OS's record, so interpreter start counts)."""
    return psutil.Process().create_time()


def raise_if_stopped() -> None:
    """Raise `Stopped` if a signal arrived whose exception did not get through (it was raised inside ray.get)."""
    if _received:
        raise Stopped(_received[-1])


def watched(work: Callable[[], T]) -> T:
    """`work()` (one that waits on Ray) in a daemon thread while the main thread waits, so that
    `stop_on_signals` can stop it: a handler's exception raised inside `ray.get` is lost there, and Ray Train's
    own SIGINT handler (set when `fit` runs in the main thread) ends the process with `sys.exit`. Work that
    computes in this process stays in the main thread: a daemon thread inside torch aborts the interpreter's
    exit. Off the main thread, just `work()`."""
    if threading.current_thread() is not threading.main_thread():
        return work()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = work()
        except BaseException as exc:  # handed to the waiting thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="raycraft-work", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in box:
        raise box["error"]
    return box["result"]


def ended_by(exc: BaseException) -> tuple[str, str]:
    """(MLflow status, reason) for a run that `exc` ended: KILLED with the signal named, else FAILED."""
    if isinstance(exc, KeyboardInterrupt):
        exc = Stopped(signal.SIGINT)
    if isinstance(exc, Stopped):
        return "KILLED", str(exc)
    return "FAILED", f"{type(exc).__name__}: {exc}"
