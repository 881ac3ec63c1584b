"""The signal side of a run's life, with real signals sent to this process: SIGTERM and SIGINT raise `Stopped` in
the main thread while `stop_on_signals` is entered (and the handlers before it come back after); work that
waits in `watched` is stopped too; a `Stopped` lost inside other code is raised again by `raise_if_stopped`;
`ended_by` names the MLflow status and reason an exception means."""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest

from raycraft import lifecycle
from raycraft.errors import Stopped


def signal_soon(sig: int, after_s: float = 0.2) -> threading.Timer:
    timer = threading.Timer(after_s, os.kill, (os.getpid(), sig))
    timer.start()
    return timer


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_raises_stopped_and_the_handlers_before_come_back(sig):
    before = signal.getsignal(sig)
    with pytest.raises(Stopped, match=f"stopped by {signal.Signals(sig).name}") as caught:
        with lifecycle.stop_on_signals():
            signal_soon(sig)
            time.sleep(30)
    assert caught.value.signum == sig
    assert signal.getsignal(sig) is before


def test_watched_work_is_stopped_by_a_signal_and_hands_back_results_and_errors():
    assert lifecycle.watched(lambda: 42) == 42
    with pytest.raises(ZeroDivisionError):
        lifecycle.watched(lambda: 1 / 0)
    started = time.monotonic()
    with pytest.raises(Stopped), lifecycle.stop_on_signals():
        signal_soon(signal.SIGTERM)
        lifecycle.watched(lambda: time.sleep(30))  # a wait the handler's exception could not interrupt
    assert time.monotonic() - started < 10


def test_a_swallowed_stop_is_raised_again():
    with lifecycle.stop_on_signals():
        lifecycle.raise_if_stopped()  # nothing arrived yet
        try:
            signal_soon(signal.SIGINT, 0.0).join()
            time.sleep(1)
        except Stopped:
            pass  # as inside ray.get, which loses the handler's exception
        with pytest.raises(Stopped, match="SIGINT"):
            lifecycle.raise_if_stopped()


def test_off_the_main_thread_signals_are_left_alone():
    seen = {}

    def in_a_trial() -> None:
        with lifecycle.stop_on_signals():
            seen["handler"] = signal.getsignal(signal.SIGTERM)
            seen["result"] = lifecycle.watched(lambda: threading.current_thread().name)

    thread = threading.Thread(target=in_a_trial, name="trial")
    thread.start()
    thread.join()
    assert seen == {"handler": signal.getsignal(signal.SIGTERM), "result": "trial"}


def test_ended_by_names_the_status_and_reason():
    assert lifecycle.ended_by(Stopped(signal.SIGTERM)) == ("KILLED", "stopped by SIGTERM")
    assert lifecycle.ended_by(KeyboardInterrupt()) == ("KILLED", "stopped by SIGINT")
    assert lifecycle.ended_by(ValueError("bad batch")) == ("FAILED", "ValueError: bad batch")


def test_process_start_time_is_the_os_record():
    assert lifecycle.process_start_time() == psutil.Process(os.getpid()).create_time()
    assert lifecycle.process_start_time() < time.time()
