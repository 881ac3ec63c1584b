"""Tune schedulers that tell a trial's training when it may go on.

Ray Train hands each epoch's report to Tune through a queue and trains on without waiting, so a trial
the scheduler stops would otherwise run ahead (on a small job, to its end and its test evaluation)
before its actors are killed. These schedulers are Tune's own, plus one step: after each CONTINUE
they tag the trial's MLflow run with the epoch they allowed (`TUNE_ALLOWED_TAG`); the trial's rank 0
waits for that tag after each epoch, or stops when the sweep has ended the run (`RunLogger.tune_allows`).
"""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler, TrialScheduler

from raycraft import tracking


class _AllowsEpochs:
    def __init__(self, *args: Any, uri: str, experiment: str, parent_run_id: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.where = (uri, experiment, parent_run_id)  # plain values: Tune pickles its scheduler

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        from raycraft.sweep.engine import children

        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.CONTINUE and "epoch" in result:
            uri = self.where[0]
            for run in children(*self.where, trial.trial_id):
                tracking.set_tags(uri, run.info.run_id, {tracking.TUNE_ALLOWED_TAG: str(int(result["epoch"]))})
        return decision


class ASHA(_AllowsEpochs, ASHAScheduler):
    """Asynchronous successive halving (Li et al. 2018)."""


class HyperBand(_AllowsEpochs, HyperBandScheduler):
    """HyperBand (Li et al. 2017)."""


class FIFO(_AllowsEpochs, FIFOScheduler):
    """Every trial runs to its end."""
