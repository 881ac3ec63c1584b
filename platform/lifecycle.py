"""A run's life in MLflow while a raycraft process works on it: who holds it, signals, and runs left behind.

- `Heartbeat`: the run is tagged with its client (host, pid, process start) and a heartbeat every
  `HEARTBEAT_S`, so a run whose client died (SIGKILL, power loss) can be told from one still working.
- `stop_on_signals`: SIGTERM and SIGINT raise `Stopped`, so the code that owns the run ends it KILLED with
  the signal named, instead of leaving it RUNNING (SIGTERM's default) or calling it a training failure.
- `reap`: RUNNING runs whose client is gone are marked KILLED (end time: their last heartbeat), with the
  reason in `raycraft.error`. `raycraft runs` and every new run on the store call it. A sweep's trials
  belong to the sweep's run: they are reaped with it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import psutil

from raycraft.errors import Stopped

T = TypeVar("T")

CLIENT_TAG = "raycraft.client"  # host:pid:process start time of the process that holds the run
HEARTBEAT_TAG = "raycraft.heartbeat"  # Unix time of the holder's latest heartbeat
HEARTBEAT_S = 30.0
STALE_S = 4 * HEARTBEAT_S  # a holder on another host is taken for dead after this long without a beat
PARENT_TAG = "mlflow.parentRunId"


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


def client_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{process_start_time():.2f}"


def holder_alive(client: str, heartbeat: float, now: float) -> bool:
    """Whether the process named by a CLIENT_TAG still holds its run: on this host, by its pid and start time
    (a reused pid is another process); elsewhere, by a heartbeat newer than STALE_S."""
    import psutil

    host, _, rest = client.partition(":")
    pid, _, started = rest.partition(":")
    if host != socket.gethostname():
        return now - heartbeat < STALE_S
    try:
        return abs(psutil.Process(int(pid)).create_time() - float(started)) < 1.0
    except (psutil.Error, ValueError):
        return False


class Heartbeat:
    """While entered: the run's CLIENT_TAG is this process, and HEARTBEAT_TAG is renewed every HEARTBEAT_S."""

    def __init__(self, uri: str, run_id: str, enabled: bool = True) -> None:
        self.uri, self.run_id, self.enabled = uri, run_id, enabled
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        from raycraft.tracking import set_tags

        while not self.stop.wait(HEARTBEAT_S):
            with contextlib.suppress(Exception):  # a busy store delays a beat; the next one comes
                set_tags(self.uri, self.run_id, {HEARTBEAT_TAG: f"{time.time():.0f}"})

    def __enter__(self) -> Heartbeat:
        from raycraft.tracking import set_tags

        if self.enabled:
            set_tags(self.uri, self.run_id, {CLIENT_TAG: client_id(), HEARTBEAT_TAG: f"{time.time():.0f}"})
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.stop.set()
            self.thread.join()


def reap(uri: str) -> list[str]:
    """Mark KILLED every RUNNING run (and its RUNNING trials) whose holder is gone; returns their ids."""
    from raycraft.tracking import ERROR_TAG, _client, set_tags

    client, now = _client(uri), time.time()
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    running = client.search_runs(experiments, "attributes.status = 'RUNNING'", max_results=5000)
    dead = [r for r in running if CLIENT_TAG in r.data.tags and PARENT_TAG not in r.data.tags
            and not holder_alive(r.data.tags[CLIENT_TAG], float(r.data.tags.get(HEARTBEAT_TAG, 0)), now)]
    reaped = []
    for run in dead:
        beat = float(run.data.tags.get(HEARTBEAT_TAG, now))
        reason = (f"its client ({run.data.tags[CLIENT_TAG].rsplit(':', 1)[0]}) stopped without ending the run; "
                  f"last heartbeat {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(beat))}")
        for held in [run, *(r for r in running if r.data.tags.get(PARENT_TAG) == run.info.run_id)]:
            set_tags(uri, held.info.run_id, {ERROR_TAG: reason})
            client.set_terminated(held.info.run_id, "KILLED", end_time=int(beat * 1000))
            reaped.append(held.info.run_id)
    return reaped
