"""A sweep trial's training in miniature, for tests of Tune's schedulers and of the sweep's engine without Ray
Train: its epochs run on a thread that does not wait for Tune to read their reports (as Ray Train's workers
do not), and after each epoch but the last it asks the sweep's pacer for a verdict, as a run's rank 0 does
(`pacing.Gate`). Each trial writes what it did to `<folder>/<trial id>.txt`, one event a line."""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import ray.cloudpickle
import ray.tune

from raycraft.sweep import pacing

EPOCHS = 4
WAIT_S = 60.0  # a verdict that takes this long never came: the gate timed out

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import tests/


def train_paced(sweep_id: str, folder: str, epoch_metrics: Callable[[int], dict[str, float]],
                finish: Callable[[], dict[str, float]] | None = None) -> None:
    """The body of a Tune function trainable: each epoch's `epoch_metrics(epoch)` goes to Tune from this
    thread while the epochs run on another, which after each asks the pacer whether to go on. With `finish`,
    a trial that runs to its end reports `finish()` in place of its last epoch (as a run's final report
    repeats its last epoch with the test metrics: `pacing.EpochReports`). Events: `epoch N`, `go N S` or
    `stop N S` (the verdict after epoch N, S seconds after asking), `finished`."""
    trial_id = ray.tune.get_context().get_trial_id()
    gate = pacing.Gate(pacing.Pacer(sweep_id), trial_id, timeout_s=WAIT_S)
    log = Path(folder) / f"{trial_id}.txt"
    reports: queue.Queue = queue.Queue()

    def train() -> None:
        for epoch in range(EPOCHS):
            metrics = epoch_metrics(epoch)
            if epoch < EPOCHS - 1 or not finish:
                reports.put(metrics)
            _write(log, f"epoch {epoch}")
            if epoch < EPOCHS - 1:
                asked = time.monotonic()
                go = gate.may_continue(epoch)
                _write(log, f"{'go' if go else 'stop'} {epoch} {time.monotonic() - asked:.2f}")
                if not go:
                    reports.put(None)
                    return
        if finish:
            reports.put(finish())
        _write(log, "finished")
        reports.put(None)

    training = threading.Thread(target=train, daemon=True)
    training.start()
    try:
        while (metrics := reports.get()) is not None:
            ray.tune.report(metrics)
    finally:  # Tune stops a trial inside its report: the training has a moment to finish what it does
        training.join(timeout=5)


def _write(log: Path, event: str) -> None:
    with log.open("a") as f:
        f.write(event + "\n")


def events(folder: Path, trial_id: str) -> list[str]:
    """A trial's events, each without its timing."""
    return [" ".join(line.split()[:2]) for line in (folder / f"{trial_id}.txt").read_text().splitlines()]


def stopped_after_first_epoch(folder: Path, trial_id: str) -> bool:
    """Whether the trial's training went no further than its first epoch. It hears the stop (`stop 0`) unless
    Tune, which ends a stopped trial's actor without waiting for its threads, ended it first."""
    return events(folder, trial_id) in (["epoch 0"], ["epoch 0", "stop 0"])


def slowest_verdict(folder: Path, trial_id: str) -> float:
    """The longest a trial waited for a verdict, in seconds."""
    lines = (folder / f"{trial_id}.txt").read_text().splitlines()
    return max((float(line.split()[2]) for line in lines if line.startswith(("go ", "stop "))), default=0.0)
