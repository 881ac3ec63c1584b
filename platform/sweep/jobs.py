"""What a sweep's trials run: a `raycraft train` job or a `raycraft rl` job.

A sweep file's `job` is exactly the config of one of those commands; a job that names `algo` is an RL
job. Both run as the plain commands do and report to Tune once per unit of progress:

| kind  | one Tune iteration        | runs                                  | a finished trial's last report  |
|-------|---------------------------|---------------------------------------|---------------------------------|
| train | an epoch                  | `run_training` (Ray Train V2)         | the test metrics                |
| rl    | an RLlib training iteration | `train_rl` (RLlib, in the trial)    | `trial_finished = 1`            |

A trial whose last report lacks that mark was stopped early by its scheduler.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from raycraft import config
from raycraft.errors import UserError
from raycraft.runner import check_cluster_resources, run_training
from raycraft.sweep.probe import reported_metrics
from raycraft.train.config import TrainConfig

if TYPE_CHECKING:
    from raycraft.sweep.pacing import TrialRun

FINISHED_METRIC = "trial_finished"


class JobKind:
    """The operations a sweep needs from its base job; subclasses fill them in for train and RL jobs."""

    name: str
    config_cls: type
    required: tuple[str, str]  # keys every job of this kind names
    resource_keys: tuple[str, ...]  # the sweep's `resources` keys that this kind of job has
    trial_cpus: float  # what Tune reserves for the trial's own process
    curve_x: tuple[str, int]  # learning curves: x label, offset added to a metric's step

    def key(self, key: str) -> str:
        """A space key as a path in the job: model keys take the `model_args.` prefix, as with `--set`."""
        return config.route(self.config_cls, key)

    def build(self, job: dict[str, Any]) -> tuple[Any, Any]:
        """(job config, model config), validated: the job's keys over what lies under them, as the plain
        command builds its config."""
        return config.build(self.config_cls, [job])

    def check(self, cfg: Any, model_cfg: Any) -> None:
        """What `build` does not check and the plain command checks before Ray starts."""

    def check_fits(self, cfg: Any) -> None:
        """Once Ray is up: whether the cluster can hold one trial."""

    def length(self, cfg: Any) -> int:
        """Tune iterations of a trial that runs to its end (a scheduler's max_t)."""
        raise NotImplementedError

    def metrics(self, cfg: Any) -> tuple[set[str], set[str]]:
        """(names a trial reports every iteration: what a sweep may rank or stop trials by, names a
        finished trial has: what a sweep may plot)."""
        raise NotImplementedError

    def finished(self, result: dict[str, Any]) -> bool:
        """Whether a trial's last result is that of a trial that ran to its end."""
        return bool(result.get(FINISHED_METRIC))

    def run(self, cfg: Any, model_cfg: Any, trial: TrialRun) -> None:
        """Run one trial in the trial's process, reporting to Tune and paced by its scheduler."""
        raise NotImplementedError


class TrainJob(JobKind):
    name = "train"
    required = ("model", "dataset")
    resource_keys = ("workers", "cpus_per_worker", "gpu")
    trial_cpus = 0.01  # the trial's process only waits on its Ray Train workers, which reserve the CPUs
    curve_x = ("epoch", 1)
    config_cls = TrainConfig

    def check(self, cfg, model_cfg):
        if cfg.in_process:
            raise UserError("job.in_process: a sweep's trials report to Tune through Ray Train's workers; "
                            "drop in_process from the job (it is for single `raycraft train` runs).")

    def check_fits(self, cfg):
        check_cluster_resources(cfg)

    def length(self, cfg):
        return cfg.epochs

    def metrics(self, cfg):
        return reported_metrics(cfg)

    def finished(self, result):
        return super().finished(result) or any(k.startswith("test_") for k in result)

    def run(self, cfg, model_cfg, trial):
        """Ray Train reports each epoch to Tune (`pacing.EpochReports`); rank 0 waits for the scheduler's
        verdict after each (`pacing.Gate`)."""
        run_training(cfg, tracking_uri=trial.uri, resume_run_id=trial.resume_run_id, run_name=trial.run_name,
                     tags=trial.tags, trial=trial.training(cfg.epochs))


def rl_run() -> Any:
    """The module `raycraft.rl.run` (with RLConfig, prepare, train_rl), imported when an RL job first needs it:
    it needs the `rl` extra (RLlib, gymnasium), which sweeps of train jobs do without, and takes seconds."""
    from raycraft.rl import run  # deferred: the `rl` extra may be missing, and RLlib is slow to import

    return run


class RLJob(JobKind):
    name = "rl"
    required = ("algo", "env")
    resource_keys = ("workers",)
    trial_cpus = 1.0  # RLlib samples (workers=0) and learns in the trial's own process
    curve_x = ("env steps", 0)

    @property
    def config_cls(self) -> type:
        return rl_run().RLConfig

    def check(self, cfg, model_cfg):
        rl_run().prepare(cfg, model_cfg)  # env id, action space against the algorithm, model APIs

    def length(self, cfg):
        return math.ceil(cfg.timesteps / cfg.steps_per_iter)

    def metrics(self, cfg):
        names = rl_run().ITERATION_METRICS
        return set(names), set(names)

    def run(self, cfg, model_cfg, trial):
        """RLlib samples and learns in this process (the learner is local; `workers` EnvRunners are
        actors of their own), which Tune's reports hold in step with the scheduler. The iteration that ends
        the run is reported once the run has logged its policy and ended, marked finished, so a scheduler
        cannot stop it half-logged."""

        def report(m: dict[str, float]) -> None:
            if not cfg.reached(m):
                trial.report(m)

        out = rl_run().train_rl(cfg, model_cfg, tracking_uri=trial.uri, resume_run_id=trial.resume_run_id,
                                run_name=trial.run_name, tags=trial.tags, on_iteration=report)
        trial.report({**out.history[-1], FINISHED_METRIC: 1.0})


KINDS = {"train": TrainJob(), "rl": RLJob()}


def kind_of(job: dict[str, Any]) -> JobKind:
    return KINDS["rl" if "algo" in job else "train"]
