"""How a sweep's scheduler and its trials' training stay in step, through a Ray actor.

Ray Train hands each epoch's report to Tune through a queue and trains on without waiting, so a trial the
scheduler stops would otherwise run ahead (on a small job, to its end and its test evaluation) before its
actors are killed. So each sweep has a `Pacer`: a named actor (`Verdicts`) that the sweep's driver starts.
The schedulers here are Tune's own plus one step (`Paced`): they tell the pacer what they decided for each
trial, the epochs it may go past or that it is stopped; after each epoch the trial's rank 0 asks the pacer
and waits for the answer (`Gate`, one of the run's `EpochHook`s). `TrialRun` is what a trial's job runs
with: where it logs, Tune's report, and for a train job the callback and gate that pace it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import ray
import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler, TrialScheduler

from raycraft.runner import Trial
from raycraft.train.worker import EpochHook

NAMESPACE = "raycraft"
WAIT_S = 600.0
"""A trial with no word from its scheduler this long after an epoch goes on (a sweep that lost its pacer
must not hold its trials for good)."""


class Verdicts:
    """A sweep's verdicts, one actor per sweep: the last epoch each trial may go past, and the trials stopped."""

    def __init__(self) -> None:
        self.allowed: dict[str, int] = {}
        self.stopped: set[str] = set()
        self.changed = asyncio.Condition()

    async def allow(self, trial_id: str, epoch: int) -> None:
        async with self.changed:
            self.allowed[trial_id] = max(epoch, self.allowed.get(trial_id, -1))
            self.changed.notify_all()

    async def stop(self, trial_id: str) -> None:
        async with self.changed:
            self.stopped.add(trial_id)
            self.changed.notify_all()

    def _verdict(self, trial_id: str, epoch: int) -> str | None:
        if self.allowed.get(trial_id, -1) >= epoch:
            return "go"
        return "stop" if trial_id in self.stopped else None

    async def verdict(self, trial_id: str, epoch: int, timeout_s: float) -> str:
        """'go' once the trial may go past `epoch`, 'stop' once it is stopped; 'none' if `timeout_s` passes
        without either."""
        async with self.changed:
            if not self._verdict(trial_id, epoch):
                try:
                    await asyncio.wait_for(self.changed.wait_for(lambda: self._verdict(trial_id, epoch)), timeout_s)
                except TimeoutError:
                    return "none"
            return self._verdict(trial_id, epoch)


class Pacer:
    """A handle on a sweep's `Verdicts` actor by name: Tune pickles its scheduler, and Ray the trials' hooks,
    so this holds the name and finds the actor at its first use. The driver `start`s the actor before Tune
    runs; it lives as long as the driver holds what `start` returned."""

    def __init__(self, sweep_id: str) -> None:
        self.sweep_id, self.name, self._actor = sweep_id, f"raycraft-pacer-{sweep_id}", None

    def __getstate__(self) -> dict[str, Any]:
        return {"sweep_id": self.sweep_id}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["sweep_id"])

    def start(self):
        return ray.remote(Verdicts).options(name=self.name, namespace=NAMESPACE, num_cpus=0,
                                            get_if_exists=True).remote()

    def actor(self):
        if self._actor is None:
            self._actor = ray.get_actor(self.name, namespace=NAMESPACE)
        return self._actor

    def allow(self, trial_id: str, epoch: int) -> None:
        self.actor().allow.remote(trial_id, epoch)

    def stop(self, trial_id: str) -> None:
        self.actor().stop.remote(trial_id)

    def verdict(self, trial_id: str, epoch: int, timeout_s: float = WAIT_S) -> str:
        return ray.get(self.actor().verdict.remote(trial_id, epoch, timeout_s))


class Paced:
    """A Tune scheduler (mixed in before it) that tells the sweep's pacer what it decided: after CONTINUE the
    trial may go past the epoch it reported; STOP, or Tune ending the trial, stops it. A PAUSE says nothing:
    the paused trial's actors go, and when it runs again it asks afresh."""

    def __init__(self, *args: Any, pacer: Pacer, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pacer = pacer

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.CONTINUE and "epoch" in result:
            self.pacer.allow(trial.trial_id, int(result["epoch"]))
        elif decision == TrialScheduler.STOP:
            self.pacer.stop(trial.trial_id)
        return decision

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, result)
        self.pacer.stop(trial.trial_id)

    def on_trial_error(self, tune_controller, trial) -> None:
        super().on_trial_error(tune_controller, trial)
        self.pacer.stop(trial.trial_id)

    def on_trial_remove(self, tune_controller, trial) -> None:
        super().on_trial_remove(tune_controller, trial)
        self.pacer.stop(trial.trial_id)


class ASHA(Paced, ASHAScheduler):
    """Asynchronous successive halving (Li et al. 2018)."""


class HyperBand(Paced, HyperBandScheduler):
    """HyperBand (Li et al. 2017)."""


class FIFO(Paced, FIFOScheduler):
    """Every trial runs to its end."""


class Gate(EpochHook):
    """Rank 0 of a trial's training, after each epoch: wait for the scheduler's verdict on it (at most
    `timeout_s`, then go on)."""

    def __init__(self, pacer: Pacer, trial_id: str, timeout_s: float = WAIT_S) -> None:
        self.pacer, self.trial_id, self.timeout_s = pacer, trial_id, timeout_s

    def may_continue(self, epoch: int) -> bool:
        return self.pacer.verdict(self.trial_id, epoch, self.timeout_s) != "stop"


class EpochReports(TuneReportCallback):
    """Tune's `TuneReportCallback`, minus the loop's report of the last epoch: the run's final report
    repeats that epoch's metrics with the test metrics, so Tune's iteration i is epoch i and a scheduler
    with max_t = epochs never stops a trial between its last epoch and its test evaluation."""

    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.epochs = epochs

    def after_report(self, run_context, metrics, checkpoint) -> None:
        last = metrics[0]
        if last.get("epoch") == self.epochs - 1 and not any(k.startswith("test_") for k in last):
            return
        super().after_report(run_context, metrics, checkpoint)


@dataclass
class TrialRun:
    """One trial's run of its job, as Tune's trainable (`engine.run_trial`) sets it up: its MLflow run (a new
    one named `run_name` with `tags`, or `resume_run_id`), and Tune's side of it."""

    uri: str
    run_name: str
    tags: dict[str, str]
    resume_run_id: str | None
    pacer: Pacer
    trial_id: str
    exploit: dict[str, Any] | None = None
    """A PBT exploit ({n, checkpoint, ...}, see `sweep.pbt`): the run continues from another trial's checkpoint."""

    @staticmethod
    def report(metrics: dict[str, float]) -> None:
        ray.tune.report(metrics)

    def training(self, epochs: int) -> Trial:
        """What paces a train job's run of `epochs` epochs: Tune's report of each epoch, rank 0's gate."""
        clone = (self.exploit["n"], self.exploit["checkpoint"]) if self.exploit else None
        return Trial(callbacks=[EpochReports(epochs)], hooks=(Gate(self.pacer, self.trial_id),), clone=clone)
