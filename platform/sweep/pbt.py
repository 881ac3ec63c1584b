"""Population-based training (Jaderberg et al. 2017) over raycraft's Ray Train trials.

Every `perturbation_interval` epochs a trial is ranked against the population by the sweep's metric. One in
the bottom `quantile_fraction` *exploits* one in the top fraction: it takes over that trial's weights,
optimizer moments, learning-rate schedule position and epoch history, then *explores*: each hyperparameter of
the space is scaled by 0.8 or 1.2 (a neighbouring value for a choice), or with `resample_probability`
drawn afresh, and clipped to its range.

Tune's `PopulationBasedTraining` makes those decisions. Its exploit step clones a Tune checkpoint, which a
raycraft trial never has: the trial's state is in Ray Train's checkpoints, whose paths reach Tune as each
epoch's `checkpoint_path`. So this scheduler, at the moment of exploit, copies the donor's latest Ray Train
checkpoint beside it (Ray Train's own rotation never deletes the copy), writes where it is into the trial's
config under `EXPLOIT_KEY`, and restarts the trial. The restarted trial (`engine.run_trial`) continues its
own MLflow run from that copy as a new Ray Train run named for the exploit, so a worker that dies after the
exploit restores from the trial's own later checkpoints, and a driver that resumes the sweep finds the
config, with `EXPLOIT_KEY`, in Tune's experiment state.

The run's MLflow metric history is that of the trial's lineage: its own epochs up to the exploit, then
the donor's epochs it did not have yet, then its own again. The run's `config.yaml` is replaced with the
config in force, each exploit is a `raycraft.pbt.exploit.N` tag, and the perturbed values at each exploit
are metrics named `pbt.<key>` at that epoch.
"""

from __future__ import annotations

import logging
import posixpath
import random
from typing import Any

import pyarrow.fs
from ray.tune.experiment import Trial
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY
from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler
from ray.tune.schedulers.pbt import _make_experiment_tag

from raycraft.sweep.jobs import KINDS
from raycraft.sweep.pacing import Paced

EXPLOIT_KEY = "__raycraft_pbt__"
"""Key of a trial's config, set by an exploit: {n, checkpoint, donor_trial, epoch}."""

log = logging.getLogger(__name__)


def clone_checkpoint(storage: str, src: str, name: str) -> str:
    """Copy the Ray Train checkpoint folder `src` (a path in `storage`'s filesystem) to a sibling `name`;
    return what `ray.train.Checkpoint` opens it by (a local path, or a URI in `storage`'s scheme)."""
    fs, _ = pyarrow.fs.FileSystem.from_uri(storage)
    dst = posixpath.join(posixpath.dirname(src.rstrip("/")), name)
    fs.create_dir(dst, recursive=True)
    pyarrow.fs.copy_files(src, dst, source_filesystem=fs, destination_filesystem=fs)
    return f"{storage.split('://')[0]}://{dst}" if "://" in storage else dst


class _ClonesRayTrainCheckpoints(PopulationBasedTraining):
    """Tune's PBT whose exploit clones Ray Train checkpoints. `bounds`: each range hyperparameter's
    (low, high), which explored values are clipped to; `storage`: the trials' Ray Train storage path."""

    def __init__(self, *args: Any, bounds: dict[str, tuple[float, float]], storage: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bounds, self.storage = bounds, storage
        self.latest: dict[str, tuple[float, str]] = {}  # trial id -> (epoch, path) of its newest checkpoint

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        """Tune's PBT pauses a trial at its perturbation while another waits PENDING or PAUSED. A trial whose
        Ray Train workers wait for CPUs is RUNNING to Tune, though: so a trial also pauses (freeing its
        workers' CPUs) while another unfinished trial is behind it, and the population moves in step."""
        if CHECKPOINT_PATH_KEY in result:
            self.latest[trial.trial_id] = (result["epoch"], result[CHECKPOINT_PATH_KEY])
        decision = super().on_trial_result(tune_controller, trial, result)
        at_perturbation = self._trial_state[trial].last_result is result
        behind = [t for t in tune_controller.get_trials() if t is not trial and t.status == Trial.RUNNING
                  and (t.last_result or {}).get("epoch", -1) < result["epoch"]]
        if decision == TrialScheduler.CONTINUE and at_perturbation and behind:
            return TrialScheduler.PAUSE
        return decision

    def _checkpoint_or_exploit(self, trial: Trial, tune_controller, upper_quantile: list[Trial],
                               lower_quantile: list[Trial]) -> None:
        """A bottom trial clones a top trial that has a checkpoint at least as far on as itself (so the
        trial's epochs only move forward); Tune saves nothing, since Ray Train already has."""
        result = self._trial_state[trial].last_result
        if trial not in lower_quantile or KINDS["train"].finished(result):  # a finished trial stays as it is
            return
        epoch = result["epoch"]
        donors = [t for t in upper_quantile if self.latest.get(t.trial_id, (-1, ""))[0] >= epoch]
        if not donors:
            log.info("pbt: no top trial has a checkpoint at epoch >= %s yet; %s goes on", epoch, trial)
            return
        self._exploit(tune_controller, trial, random.choice(donors))

    def _exploit(self, tune_controller, trial: Trial, trial_to_clone: Trial) -> None:
        state, donor = self._trial_state[trial], self._trial_state[trial_to_clone]
        donor_epoch, path = self.latest[trial_to_clone.trial_id]
        n = trial.config.get(EXPLOIT_KEY, {}).get("n", 0) + 1
        try:
            start = clone_checkpoint(self.storage, path, f"pbt_clone_{trial.trial_id}_{n}")
        except (OSError, FileNotFoundError) as exc:  # rotated away since it was reported
            log.warning("pbt: cannot copy %s's checkpoint %s (%s); %s goes on", trial_to_clone, path, exc, trial)
            return
        new_config, _ = self._get_new_config(trial, trial_to_clone)
        for key, (low, high) in self.bounds.items():
            new_config[key] = type(new_config[key])(min(max(new_config[key], low), high))
        new_config[EXPLOIT_KEY] = {"n": n, "checkpoint": start, "donor_trial": trial_to_clone.trial_id,
                                   "epoch": int(donor_epoch)}
        log.info("pbt: trial %s takes over %s at epoch %d: %s", trial, trial_to_clone, donor_epoch,
                 {k: new_config[k] for k in self._hyperparam_mutations})
        if trial.status != Trial.PAUSED:
            tune_controller.pause_trial(trial, should_checkpoint=False)
        trial.set_experiment_tag(_make_experiment_tag(state.orig_tag, new_config, self._hyperparam_mutations))
        trial.set_config(new_config)
        self._num_perturbations += 1
        state.last_perturbation_time = donor.last_perturbation_time
        state.last_train_time = donor.last_train_time


class PBT(Paced, _ClonesRayTrainCheckpoints):
    """raycraft's PBT: a trial goes past an epoch only once the scheduler lets it (see `sweep.pacing`)."""
