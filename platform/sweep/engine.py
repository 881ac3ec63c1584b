"""Run a sweep with Ray Tune: one MLflow parent run, one nested child run per trial.

Each trial is a Tune function trainable that runs its job as the plain command does (`sweep.jobs`): a
train job calls `raycraft.runner.run_training`, the same Train V2 `TorchTrainer` as `raycraft train`,
whose epochs reach Tune through a Ray Train callback; an RL job calls `train_rl` and reports each RLlib
iteration. Schedulers (ASHA, HyperBand, PBT) see every report, and their verdicts reach the trials'
training through the sweep's pacer actor (`sweep.pacing`), which the driver starts. The child run carries
`mlflow.parentRunId` and the trial id. The driver marks what Tune decides: a trial stopped early is tagged
`raycraft.early_stopped=true` and ends KILLED.

Resume: Tune's experiment state lives in `<storage_path>/<name>`, beside `raycraft_sweep.yaml` (the
validated sweep and its parent run id). `--resume NAME` restores Tune (finished trials are not run
again) and reattaches each restarted trial to its child run, which continues from its last Ray Train
checkpoint; a trial whose child run already ended only reports its final metrics again.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.tune
import torch
import yaml
from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.search.basic_variant import BasicVariantGenerator

from raycraft import tracking
from raycraft.cluster import init_ray
from raycraft.config import flatten, read_yaml, to_dict
from raycraft.console import TrialProgress, format_metrics
from raycraft.errors import TrainingError, UserError
from raycraft.sweep import pacing
from raycraft.sweep.config import POINT, Sweep, load_sweep
from raycraft.sweep.jobs import FINISHED_METRIC, KINDS
from raycraft.sweep.pbt import EXPLOIT_KEY, PBT
from raycraft.sweep.plots import curves_png, metric_vs_params_png

STATE_FILE = "raycraft_sweep.yaml"
TRIAL_TAG = "raycraft.trial_id"
PARENT_TAG = tracking.PARENT_TAG
EARLY_TAG = "raycraft.early_stopped"
DISPLAYS: dict[str, TrialProgress] = {}
"""The live display of each sweep this process drives, by parent run id: the driver's callback finds it here,
since Tune pickles the callback itself with the experiment state."""


Finish = Callable[[tracking.Run, list[Any]], None]
"""What a caller records on the parent run from its child runs once every trial has ended, before the parent
ends (`raycraft scaling`'s fits); the parent ends FAILED if it raises."""


@dataclass
class SweepOutcome:
    name: str
    parent_run_id: str
    best_run_id: str | None
    best_metric: float | None
    best_params: dict[str, Any]
    children: list[Any]


def sweep_dir(sweep_storage: str, name: str) -> Path:
    return Path(sweep_storage).resolve() / name


def resolved_job(sweep: Sweep) -> dict[str, Any]:
    """The base job with every path absolute (trials run in their own folders) and the sweep's experiment."""
    job = copy.deepcopy(sweep.job)
    base, _ = sweep.kind.build(job)
    job["experiment"] = sweep.config.experiment
    storage = base.storage_path
    job["storage_path"] = storage if "://" in storage else str(Path(storage).resolve())
    if getattr(base, "data", None) and base.data.data_dir:
        job.setdefault("data", {})["data_dir"] = str(Path(base.data.data_dir).resolve())
    return job


def children(uri: str, experiment: str, parent_run_id: str, trial_id: str | None = None) -> list[Any]:
    """The child runs of a sweep (optionally of one trial), oldest first."""
    query = f"tags.`{PARENT_TAG}` = '{parent_run_id}'"
    if trial_id:
        query += f" and tags.`{TRIAL_TAG}` = '{trial_id}'"
    return tracking.search_runs(uri, experiment, query)


def is_done(run: Any) -> bool:
    return run.info.status == "FINISHED" or run.data.tags.get(EARLY_TAG) == "true"


def run_trial(params: dict[str, Any], *, sweep: Sweep, parent_run_id: str, uri: str) -> None:
    """Tune's function trainable: one trial = one run of the job, reported as it goes and paced by the sweep's
    scheduler (`sweep.pacing`). A PBT trial that took over another's checkpoint (`params[EXPLOIT_KEY]`)
    continues its own run from that checkpoint."""
    torch.set_num_threads(1)
    trial_id = ray.tune.get_context().get_trial_id()
    kind = sweep.kind
    params = dict(params)
    exploit = params.pop(EXPLOIT_KEY, None)
    cfg, model_cfg = kind.build(sweep.trial_job(params))
    previous = children(uri, cfg.experiment, parent_run_id, trial_id)
    if previous and is_done(previous[-1]):  # ended before the driver recorded it: report, do not rerun
        run = previous[-1]
        ray.tune.report({**run.data.metrics, **({FINISHED_METRIC: 1.0} if run.info.status == "FINISHED" else {})})
        return
    if exploit:
        record_exploit(uri, previous[-1], exploit, cfg, params)
    tags = {PARENT_TAG: parent_run_id, TRIAL_TAG: trial_id, "raycraft.sweep": sweep.config.name,
            **{f"raycraft.param.{k}": str(v) for k, v in params.items()}}
    kind.run(cfg, model_cfg, pacing.TrialRun(uri, f"{sweep.config.name}-{trial_id}", tags,
                                             previous[-1].info.run_id if previous else None,
                                             pacing.Pacer(parent_run_id), trial_id, exploit))


def record_exploit(uri: str, run: Any, exploit: dict[str, Any], cfg: Any, params: dict[str, Any]) -> None:
    """Once per exploit: tag the trial's run with it, log the explored values as `pbt.<key>` metrics at the
    epoch it starts from, and make the run's config.yaml the config now in force."""
    tag = f"raycraft.pbt.exploit.{exploit['n']}"
    if tag in run.data.tags:
        return
    child = tracking.Run(uri, run.info.run_id)
    child.log_metrics({f"pbt.{k}": v for k, v in params.items() if isinstance(v, (int, float))},
                      step=exploit["epoch"] + 1)
    child.log_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), "config.yaml")
    record = {"from_trial": exploit["donor_trial"], "at_epoch": exploit["epoch"], **params}
    child.set_tags({tag: yaml.safe_dump(record, default_flow_style=True).strip()})


class MlflowSweepCallback(Callback):
    """Driver side: shows progress (on the sweep's display in `DISPLAYS`, else printed if `verbose`) and
    records in MLflow how each trial ended. Tune pickles its callbacks with the experiment state: this one
    holds only plain values."""

    def __init__(self, uri: str, experiment: str, parent_run_id: str, kind: str, verbose: bool) -> None:
        self.uri, self.experiment, self.parent_run_id, self.kind, self.verbose = (uri, experiment, parent_run_id,
                                                                                  kind, verbose)

    def echo(self, line: str, trials: list, now: Any = None, status: str | None = None, ended: bool = True) -> None:
        """`line` on the sweep's display, with its counts of `trials` (`now`: the trial whose `status` Tune
        sets after this callback), or printed, where the sweep has no display."""
        display = DISPLAYS.get(self.parent_run_id)
        if display is None:
            if self.verbose:
                print(line)
            return
        (display.result if ended else display.note)(line)
        display.count(*trial_counts(trials, now, status))

    def on_trial_start(self, iteration, trials, trial, **info):
        if (display := DISPLAYS.get(self.parent_run_id)) is not None:
            display.count(*trial_counts(trials, trial, Trial.RUNNING))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if (display := DISPLAYS.get(self.parent_run_id)) is not None:
            display.reported(trial.trial_id, result)
        if "epoch" in result:
            shown = {k: v for k, v in result.items() if k.startswith(("val_", "train_"))}
            self.echo(f"trial {trial.trial_id} epoch {int(result['epoch']) + 1}  {format_metrics(shown)}", trials,
                      ended=False)
        elif "env_steps" in result:
            shown = {k: result[k] for k in ("env_steps", "return_mean", "eval_return_mean") if k in result}
            self.echo(f"trial {trial.trial_id} iteration {int(result['iteration'])}  {format_metrics(shown)}", trials,
                      ended=False)

    def on_trial_complete(self, iteration, trials, trial, **info):
        early = not KINDS[self.kind].finished(trial.last_result or {})
        for run in children(self.uri, self.experiment, self.parent_run_id, trial.trial_id):
            child = tracking.Run(self.uri, run.info.run_id)
            child.set_tags({EARLY_TAG: str(early).lower()})
            # Tune stopped the actor before the run ended, or the stop interrupted the run (RL: FAILED)
            if run.info.status == "RUNNING" or (early and run.info.status == "FAILED"):
                child.end("KILLED" if early else "FINISHED")
        self.echo(f"trial {trial.trial_id} {'stopped early' if early else 'finished'}", trials, trial,
                  Trial.TERMINATED)

    def on_trial_error(self, iteration, trials, trial, **info):
        for run in children(self.uri, self.experiment, self.parent_run_id, trial.trial_id):
            if run.info.status == "RUNNING":
                tracking.Run(self.uri, run.info.run_id).end("FAILED", str(trial.error_file or "trial error"))
        self.echo(f"trial {trial.trial_id} failed: see {trial.error_file}", trials)


def trial_counts(trials: list, now: Any = None, status: str | None = None) -> tuple[int, int, float]:
    """(trials ended, trials running, iterations reported by the trials not ended) of Tune's `trials`, with
    trial `now` taken as `status`: Tune calls a callback before it sets the trial's new status."""
    statuses = {t.trial_id: t.status for t in trials} | ({now.trial_id: status} if now is not None else {})
    ended = {i for i, s in statuses.items() if s in (Trial.TERMINATED, Trial.ERROR)}
    running = sum(s == Trial.RUNNING for s in statuses.values())
    progressed = sum((t.last_result or {}).get("training_iteration", 0) for t in trials if t.trial_id not in ended)
    return len(ended), running, progressed


@contextlib.contextmanager
def displayed(sweep: Sweep, parent_run_id: str, show: bool) -> Iterator[None]:
    """While entered (with `show`), the sweep's trials on a live display (`console.TrialProgress`): `samples`
    trials, each repeating the whole grid."""
    if not show:
        yield
        return
    trials = sweep.config.samples * math.prod(len(d.values) for d in sweep.space.values() if d.kind == "grid")
    with TrialProgress(trials, sweep.length, sweep.config.metric, sweep.config.mode) as display:
        DISPLAYS[parent_run_id] = display
        try:
            yield
        finally:
            DISPLAYS.pop(parent_run_id, None)


def build_search(sweep: Sweep):
    cfg = sweep.config
    if cfg.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch  # the `tune` extra (optuna), which may be missing

        return OptunaSearch(metric=cfg.metric, mode=cfg.mode, seed=cfg.seed)
    if cfg.search == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch  # the `tune` extra (hyperopt), which may be missing

        return HyperOptSearch(metric=cfg.metric, mode=cfg.mode, random_state_seed=cfg.seed)
    # Tune applies max_concurrent_trials only to searchers it wraps itself: this one limits its own. PBT
    # needs its whole population from the start: its trials run as resources allow and take turns.
    return BasicVariantGenerator(random_state=cfg.seed,
                                 max_concurrent=0 if cfg.scheduler.name == "pbt" else cfg.concurrency)


def build_scheduler(sweep: Sweep, pacer: pacing.Pacer):
    """The sweep's Tune scheduler, which tells `pacer` what it decides for each trial."""
    s = sweep.config.scheduler
    if s.name == "asha":
        return pacing.ASHA(max_t=sweep.length, grace_period=min(s.grace_period, sweep.length),
                           reduction_factor=s.reduction_factor, pacer=pacer)
    if s.name == "hyperband":
        return pacing.HyperBand(max_t=sweep.length, reduction_factor=s.reduction_factor, pacer=pacer)
    if s.name == "pbt":
        mutations = {k: list(d.values) if d.kind in ("choice", "grid") else d.tune() for k, d in sweep.space.items()}
        bounds = {k: (d.values[0], d.values[1] - (d.kind == "randint")) for k, d in sweep.space.items()
                  if d.kind not in ("choice", "grid")}  # randint's high is exclusive
        return PBT(time_attr="epoch", perturbation_interval=s.perturbation_interval,
                   quantile_fraction=s.quantile_fraction, resample_probability=s.resample_probability,
                   hyperparam_mutations=mutations, bounds=bounds, storage=resolved_job(sweep)["storage_path"],
                   pacer=pacer)
    return pacing.FIFO(pacer=pacer)


def trainable(sweep: Sweep, parent_run_id: str, uri: str):
    job = resolved_job(sweep)
    fixed = Sweep(sweep.config, job, sweep.space, sweep.length)
    trial = ray.tune.with_parameters(run_trial, sweep=fixed, parent_run_id=parent_run_id, uri=uri)
    return ray.tune.with_resources(trial, {"CPU": sweep.kind.trial_cpus})


def local_cpus(sweep: Sweep) -> int:
    """CPUs a local Ray declares for the sweep: the machine's, and for train jobs one more, which their trial
    processes' reservations (`trial_cpus`, 0.01 each beside their workers' whole CPUs) take. On exactly the
    machine's cores two 1-CPU trials on 2 cores need 2.02: the second trial's workers waited for the first trial
    to end (measured on a scaling search: each of its 1-CPU trials' start-up ended when the one before ended)."""
    cores = os.cpu_count() or 1
    return cores + 1 if sweep.kind.trial_cpus < 1 else cores


def check_fits(sweep: Sweep) -> None:
    sweep.kind.check_fits(sweep.kind.build(sweep.job)[0])


def start_parent(sweep: Sweep, uri: str, kind: str = "sweep") -> str:
    cfg = sweep.config
    params = {"search": cfg.search, "scheduler": cfg.scheduler.name, "metric": cfg.metric, "mode": cfg.mode,
              "samples": cfg.samples, "concurrency": cfg.concurrency,
              **{f"space.{k}": f"{d.kind}{list(d.values)}" for k, d in sweep.space.items()},
              **{f"job.{k}": v for k, v in flatten(to_dict(sweep.kind.build(sweep.job)[0])).items()}}
    return tracking.Run.start(uri, cfg.experiment, f"sweep-{cfg.name}", params,
                              {"raycraft.sweep": cfg.name, "raycraft.kind": kind},
                              yaml.safe_dump(sweep_state(sweep, ""), sort_keys=False)).run_id


def sweep_state(sweep: Sweep, parent_run_id: str) -> dict[str, Any]:
    return {"parent_run_id": parent_run_id, "sweep": {**to_dict(sweep.config), "job": sweep.job}}


def run_sweep(sweep: Sweep, *, tracking_uri: str | None = None, address: str | None = None,
              resume: bool = False, echo: Callable[[str], None] | None = None, finish: Finish | None = None,
              kind: str = "sweep") -> SweepOutcome:
    """Start (or with `resume`, continue) the sweep, then record the best trial (and what `finish` records) on
    the parent run, tagged `raycraft.kind` = `kind`."""
    cfg = sweep.config
    uri = tracking.resolve_tracking_uri(tracking_uri)
    folder = sweep_dir(cfg.storage_path, cfg.name)
    if not resume and folder.exists():
        raise UserError(f"name: a sweep {cfg.name!r} already exists in {folder.parent}; continue it with "
                        f"`--resume {cfg.name}` or give another name (`--set name=...`).")
    init_ray(address, local_cpus(sweep))
    check_fits(sweep)
    # Tune's experiment state is written at most this often: a killed driver loses less on resume.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    parent, tuner = (restored_tuner(sweep, uri, folder) if resume
                     else new_tuner(sweep, uri, folder, echo is not None, kind))
    if echo:
        echo(f"sweep {cfg.name}: MLflow parent run {parent.run_id}")
    verdicts = pacing.Pacer(parent.run_id).start()  # the actor lives while this reference does
    try:
        # Tune handles Ctrl+C itself: it saves its state and returns
        with parent.heartbeat(), displayed(sweep, parent.run_id, echo is not None):
            results = tuner.fit()
    except BaseException as exc:
        parent.end_with(exc)
        raise
    finally:
        ray.kill(verdicts)
    if len(results) > results.num_terminated + results.num_errors:  # Ctrl+C: Tune saved its state and returned
        raise TrainingError(f"sweep {cfg.name!r} was interrupted; its state is saved. Continue it with "
                            f"`raycraft tune FILE --resume {cfg.name}`.")
    return summarize(sweep, uri, parent.run_id, finish)


def new_tuner(sweep: Sweep, uri: str, folder: Path, verbose: bool,
              kind: str = "sweep") -> tuple[tracking.Run, ray.tune.Tuner]:
    """(parent run, Tuner) of a new sweep: its parent run, and its state file in `folder`."""
    cfg = sweep.config
    parent = start_parent(sweep, uri, kind)
    folder.mkdir(parents=True)
    (folder / STATE_FILE).write_text(yaml.safe_dump(sweep_state(sweep, parent), sort_keys=False))
    # the basic generator limits itself (build_search); Tune wraps the others in a limiter
    limit_by_tune = cfg.concurrency if cfg.search in ("optuna", "hyperopt") else None
    return tracking.Run(uri, parent), ray.tune.Tuner(
        trainable(sweep, parent, uri),
        param_space=sweep.param_space(),
        tune_config=ray.tune.TuneConfig(metric=cfg.metric, mode=cfg.mode, num_samples=cfg.samples,
                                        max_concurrent_trials=limit_by_tune, search_alg=build_search(sweep),
                                        scheduler=build_scheduler(sweep, pacing.Pacer(parent))),
        run_config=ray.tune.RunConfig(name=cfg.name, storage_path=str(folder.parent), verbose=0,
                                      callbacks=[MlflowSweepCallback(uri, cfg.experiment, parent, sweep.kind.name,
                                                                     verbose)]))


def restored_tuner(sweep: Sweep, uri: str, folder: Path) -> tuple[tracking.Run, ray.tune.Tuner]:
    """(parent run, Tuner) of the sweep saved in `folder`, its parent run reopened; finished trials are not
    run again."""
    parent = read_yaml((folder / STATE_FILE).read_text(), str(folder / STATE_FILE))["parent_run_id"]
    tuner = ray.tune.Tuner.restore(str(folder), trainable(sweep, parent, uri), resume_unfinished=True,
                                   resume_errored=True)
    return tracking.Run.resume(uri, parent), tuner


def summarize(sweep: Sweep, uri: str, parent_run_id: str, finish: Finish | None = None) -> SweepOutcome:
    """Best trial, counts and plots (and what `finish` records) on the parent run; the parent ends FINISHED, or
    FAILED if `finish` raises."""
    cfg, parent = sweep.config, tracking.Run(uri, parent_run_id)
    runs = children(uri, cfg.experiment, parent_run_id)
    sign = 1 if cfg.mode == "min" else -1
    scored = [r for r in runs if cfg.metric in r.data.metrics]
    best = min(scored, key=lambda r: sign * r.data.metrics[cfg.metric]) if scored else None
    figures = {"trials": len(runs),
               "trials_finished": sum(r.info.status == "FINISHED" for r in runs),
               "trials_early_stopped": sum(r.data.tags.get(EARLY_TAG) == "true" for r in runs),
               "trials_failed": sum(r.info.status == "FAILED" for r in runs)}
    best_params: dict[str, Any] = {}
    if best is not None:  # its config.yaml holds the values in force at its end (PBT changes them)
        best_config = tracking.download_text(uri, best.info.run_id, "config.yaml")
        job = read_yaml(best_config, f"run {best.info.run_id}'s config.yaml")
        best_params = {k: functools.reduce(lambda node, part: node[part], sweep.key(k).split("."), job)
                       for k in sweep.space if k != POINT}
        if POINT in sweep.space:
            best_params[POINT] = int(best.data.tags[f"raycraft.param.{POINT}"])
        figures[f"best_{cfg.metric}"] = best.data.metrics[cfg.metric]
        parent.set_tags({"raycraft.best_run_id": best.info.run_id,
                         "raycraft.best_trial": best.data.tags.get(TRIAL_TAG, ""),
                         **{f"best.{k}": v for k, v in best_params.items()}})
        parent.log_text(best_config, "best_config.yaml")
    parent.log_metrics(figures)
    histories = {r.info.run_id: tracking.metric_history(uri, r.info.run_id, cfg.metric) for r in runs}
    with tempfile.TemporaryDirectory() as tmp:
        metric_vs_params_png(sweep, runs, Path(tmp) / "metric_vs_params.png")
        curves_png(cfg.metric, runs, histories, Path(tmp) / "learning_curves.png", sweep.kind.curve_x)
        parent.log_artifacts(tmp, "plots")
    if finish is not None:
        try:
            finish(parent, runs)
        except BaseException as exc:
            parent.end_with(exc)
            raise
    parent.end()
    return SweepOutcome(cfg.name, parent_run_id, best.info.run_id if best else None,
                        best.data.metrics[cfg.metric] if best else None, best_params, runs)


def resume_sweep(name: str, storage_path: str = "ray_results", **kwargs: Any) -> SweepOutcome:
    """Continue sweep NAME from its saved state."""
    folder = sweep_dir(storage_path, name)
    if not (folder / STATE_FILE).is_file():
        found = sorted(p.parent.name for p in Path(storage_path).resolve().glob(f"*/{STATE_FILE}"))
        raise UserError(f"--resume: no sweep {name!r} in {folder.parent}. Sweeps there: "
                        f"{', '.join(found) or 'none'}.")
    state = read_yaml((folder / STATE_FILE).read_text(), str(folder / STATE_FILE))
    return run_sweep(load_sweep(data=state["sweep"]), resume=True, **kwargs)
