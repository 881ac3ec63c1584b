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

import dataclasses
import math
from typing import Any

from raycraft.errors import UserError

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
        head = key.split(".")[0]
        return key if head in {f.name for f in dataclasses.fields(self.config_cls)} else f"model_args.{key}"

    def build(self, job: dict[str, Any]) -> tuple[Any, Any]:
        """(job config, model config), validated."""
        raise NotImplementedError

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

    def run(self, cfg: Any, model_cfg: Any, *, uri: str, resume_run_id: str | None, run_name: str,
            tags: dict[str, str], start_from: dict[str, Any] | None = None) -> None:
        """Run one trial in the trial's process, reporting to Tune. `start_from`: a PBT exploit (train jobs;
        see `sweep.pbt`)."""
        raise NotImplementedError


class TrainJob(JobKind):
    name = "train"
    required = ("model", "dataset")
    resource_keys = ("workers", "cpus_per_worker", "gpu")
    trial_cpus = 0.01  # the trial's process only waits on its Ray Train workers, which reserve the CPUs
    curve_x = ("epoch", 1)

    @property
    def config_cls(self) -> type:
        from raycraft.train.config import TrainConfig

        return TrainConfig

    def build(self, job):
        from raycraft.train.config import build_config

        return build_config(job)

    def check(self, cfg, model_cfg):
        if cfg.in_process:
            raise UserError("job.in_process: a sweep's trials report to Tune through Ray Train's workers; "
                            "drop in_process from the job (it is for single `raycraft train` runs).")

    def check_fits(self, cfg):
        from raycraft.runner import check_cluster_resources

        check_cluster_resources(cfg)

    def length(self, cfg):
        return cfg.epochs

    def metrics(self, cfg):
        from raycraft.sweep.config import reported_metrics

        return reported_metrics(cfg)

    def finished(self, result):
        return super().finished(result) or any(k.startswith("test_") for k in result)

    def run(self, cfg, model_cfg, *, uri, resume_run_id, run_name, tags, start_from=None):
        from raycraft.runner import run_training

        run_training(cfg, tracking_uri=uri, resume_run_id=resume_run_id, run_name=run_name, tags=tags,
                     callbacks=[report_callback(cfg.epochs)], paced_by_tune=True,
                     clone=(start_from["n"], start_from["checkpoint"]) if start_from else None)


def report_callback(epochs: int):
    """Tune's `TuneReportCallback`, minus the loop's report of the last epoch: the run's final report
    repeats that epoch's metrics with the test metrics, so Tune's iteration i is epoch i and a scheduler
    with max_t = epochs never stops a trial between its last epoch and its test evaluation."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            last = metrics[0]
            if last.get("epoch") == epochs - 1 and not any(k.startswith("test_") for k in last):
                return
            super().after_report(run_context, metrics, checkpoint)

    return EpochReportCallback()


class RLJob(JobKind):
    name = "rl"
    required = ("algo", "env")
    resource_keys = ("workers",)
    trial_cpus = 1.0  # RLlib samples (workers=0) and learns in the trial's own process
    curve_x = ("env steps", 0)

    @property
    def config_cls(self) -> type:
        from raycraft.rl.config import RLConfig

        return RLConfig

    def build(self, job):
        from raycraft.rl.config import build_rl_config

        return build_rl_config(job, [])

    def check(self, cfg, model_cfg):
        from raycraft.rl.run import prepare

        prepare(cfg, model_cfg)  # env id, action space against the algorithm, model APIs

    def length(self, cfg):
        return math.ceil(cfg.timesteps / cfg.steps_per_iter)

    def metrics(self, cfg):
        from raycraft.rl.run import ITERATION_METRICS

        return set(ITERATION_METRICS), set(ITERATION_METRICS)

    def run(self, cfg, model_cfg, *, uri, resume_run_id, run_name, tags, start_from=None):
        """RLlib samples and learns in this process (the learner is local; `workers` EnvRunners are
        actors of their own). The iteration that ends the run is reported once the run has logged its
        policy and ended, marked finished, so a scheduler cannot stop it half-logged."""
        import ray.tune

        from raycraft.rl.run import train_rl

        def report(m: dict[str, float]) -> None:
            if not cfg.reached(m):
                ray.tune.report(m)

        out = train_rl(cfg, model_cfg, tracking_uri=uri, resume_run_id=resume_run_id, run_name=run_name,
                       tags=tags, on_iteration=report)
        ray.tune.report({**out.history[-1], FINISHED_METRIC: 1.0})


KINDS = {"train": TrainJob(), "rl": RLJob()}


def kind_of(job: dict[str, Any]) -> JobKind:
    return KINDS["rl" if "algo" in job else "train"]
