"""Run a sweep with Ray Tune: one MLflow parent run, one nested child run per trial.

Each trial is a Tune function trainable that runs its job as the plain command does (`sweep.jobs`): a
train job calls `raycraft.runner.run_training`, the same Train V2 `TorchTrainer` as `raycraft train`,
whose epochs reach Tune through `TuneReportCallback`; an RL job calls `train_rl` and reports each RLlib
iteration. Schedulers (ASHA, HyperBand) see every report. The child run carries `mlflow.parentRunId`
and the trial id. The driver marks what Tune decides: a trial stopped early is tagged
`raycraft.early_stopped=true` and ends KILLED.

Resume: Tune's experiment state lives in `<storage_path>/<name>`, beside `raycraft_sweep.yaml` (the
validated sweep and its parent run id). `--resume NAME` restores Tune (finished trials are not run
again) and reattaches each restarted trial to its child run, which continues from its last Ray Train
checkpoint; a trial whose child run already ended only reports its final metrics again.
"""

from __future__ import annotations

import copy
import functools
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from raycraft import lifecycle, tracking
from raycraft.config import flatten, read_yaml
from raycraft.errors import UserError
from raycraft.sweep.config import Sweep, load_sweep
from raycraft.sweep.jobs import FINISHED_METRIC

STATE_FILE = "raycraft_sweep.yaml"
TRIAL_TAG = "raycraft.trial_id"
PARENT_TAG = "mlflow.parentRunId"
EARLY_TAG = "raycraft.early_stopped"


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
    runs = tracking._client(uri).search_runs([tracking.experiment_id(uri, experiment)], query,
                                              max_results=10000, order_by=["attributes.start_time ASC"])
    return list(runs)


def is_done(run: Any) -> bool:
    return run.info.status == "FINISHED" or run.data.tags.get(EARLY_TAG) == "true"


def run_trial(params: dict[str, Any], *, sweep: Sweep, parent_run_id: str, uri: str) -> None:
    """Tune's function trainable: one trial = one run of the job, reported as it goes. A PBT trial that took
    over another's checkpoint (`params[EXPLOIT_KEY]`) continues its own run from that checkpoint."""
    import ray.tune
    import torch

    from raycraft.sweep.pbt import EXPLOIT_KEY

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
    kind.run(cfg, model_cfg, uri=uri, resume_run_id=previous[-1].info.run_id if previous else None,
             run_name=f"{sweep.config.name}-{trial_id}", start_from=exploit,
             tags={PARENT_TAG: parent_run_id, TRIAL_TAG: trial_id, "raycraft.sweep": sweep.config.name,
                   **{f"raycraft.param.{k}": str(v) for k, v in params.items()}})


def record_exploit(uri: str, run: Any, exploit: dict[str, Any], cfg: Any, params: dict[str, Any]) -> None:
    """Once per exploit: tag the trial's run with it, log the explored values as `pbt.<key>` metrics at the
    epoch it starts from, and make the run's config.yaml the config now in force."""
    from mlflow.entities import Metric

    from raycraft.config import to_dict

    tag = f"raycraft.pbt.exploit.{exploit['n']}"
    if tag in run.data.tags:
        return
    client, now, step = tracking._client(uri), int(time.time() * 1000), exploit["epoch"] + 1
    client.log_batch(run.info.run_id, metrics=[Metric(f"pbt.{k}", float(v), now, step) for k, v in params.items()
                                               if isinstance(v, (int, float))])
    client.log_text(run.info.run_id, yaml.safe_dump(to_dict(cfg), sort_keys=False), "config.yaml")
    record = {"from_trial": exploit["donor_trial"], "at_epoch": exploit["epoch"], **params}
    tracking.set_tags(uri, run.info.run_id, {tag: yaml.safe_dump(record, default_flow_style=True).strip()})


def make_callback(uri: str, experiment: str, parent_run_id: str, kind: str, verbose: bool):
    """Tune pickles its callbacks with the experiment state: this one holds only plain values."""
    from ray.tune import Callback

    from raycraft.sweep.jobs import KINDS

    echo = print if verbose else None

    class MlflowSweepCallback(Callback):
        """Driver side: prints progress and records in MLflow how each trial ended."""

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if echo and "epoch" in result:
                shown = {k: v for k, v in result.items() if k.startswith(("val_", "train_"))}
                echo(f"trial {trial.trial_id} epoch {int(result['epoch']) + 1}  "
                     + "  ".join(f"{k} {v:.4g}" for k, v in sorted(shown.items())))
            elif echo and "env_steps" in result:
                shown = {k: result[k] for k in ("env_steps", "return_mean", "eval_return_mean") if k in result}
                echo(f"trial {trial.trial_id} iteration {int(result['iteration'])}  "
                     + "  ".join(f"{k} {v:.4g}" for k, v in shown.items()))

        def on_trial_complete(self, iteration, trials, trial, **info):
            early = not KINDS[kind].finished(trial.last_result or {})
            for run in children(uri, experiment, parent_run_id, trial.trial_id):
                tracking.set_tags(uri, run.info.run_id, {EARLY_TAG: str(early).lower()})
                # Tune stopped the actor before the run ended, or the stop interrupted the run (RL: FAILED)
                if run.info.status == "RUNNING" or (early and run.info.status == "FAILED"):
                    if early:
                        tracking.set_tags(uri, run.info.run_id, {"raycraft.status": "early_stopped"})
                    tracking.end_run(uri, run.info.run_id, "KILLED" if early else "FINISHED")
            if echo:
                echo(f"trial {trial.trial_id} {'stopped early' if early else 'finished'}")

        def on_trial_error(self, iteration, trials, trial, **info):
            for run in children(uri, experiment, parent_run_id, trial.trial_id):
                if run.info.status == "RUNNING":
                    tracking.end_run(uri, run.info.run_id, "FAILED", str(trial.error_file or "trial error"))
            if echo:
                echo(f"trial {trial.trial_id} failed: see {trial.error_file}")

    return MlflowSweepCallback()


def build_search(sweep: Sweep):
    cfg = sweep.config
    if cfg.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=cfg.metric, mode=cfg.mode, seed=cfg.seed)
    if cfg.search == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch(metric=cfg.metric, mode=cfg.mode, random_state_seed=cfg.seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Tune applies max_concurrent_trials only to searchers it wraps itself: this one limits its own. PBT
    # needs its whole population from the start: its trials run as resources allow and take turns.
    return BasicVariantGenerator(random_state=cfg.seed,
                                 max_concurrent=0 if cfg.scheduler.name == "pbt" else cfg.concurrency)


def build_scheduler(sweep: Sweep, uri: str, parent_run_id: str):
    from raycraft.sweep import pacing

    s = sweep.config.scheduler
    where = {"uri": uri, "experiment": sweep.config.experiment, "parent_run_id": parent_run_id}
    if s.name == "asha":
        return pacing.ASHA(max_t=sweep.length, grace_period=min(s.grace_period, sweep.length),
                           reduction_factor=s.reduction_factor, **where)
    if s.name == "hyperband":
        return pacing.HyperBand(max_t=sweep.length, reduction_factor=s.reduction_factor, **where)
    if s.name == "pbt":
        from raycraft.sweep.pbt import PBT

        mutations = {k: list(d.values) if d.kind in ("choice", "grid") else d.tune() for k, d in sweep.space.items()}
        bounds = {k: (d.values[0], d.values[1] - (d.kind == "randint")) for k, d in sweep.space.items()
                  if d.kind not in ("choice", "grid")}  # randint's high is exclusive
        return PBT(time_attr="epoch", perturbation_interval=s.perturbation_interval,
                   quantile_fraction=s.quantile_fraction, resample_probability=s.resample_probability,
                   hyperparam_mutations=mutations, bounds=bounds, storage=resolved_job(sweep)["storage_path"],
                   **where)
    return pacing.FIFO(**where)


def trainable(sweep: Sweep, parent_run_id: str, uri: str):
    from ray import tune

    job = resolved_job(sweep)
    fixed = Sweep(sweep.config, job, sweep.space, sweep.length)
    return tune.with_resources(tune.with_parameters(run_trial, sweep=fixed, parent_run_id=parent_run_id, uri=uri),
                               {"CPU": sweep.kind.trial_cpus})


def check_fits(sweep: Sweep) -> None:
    sweep.kind.check_fits(sweep.kind.build(sweep.job)[0])


def start_parent(sweep: Sweep, uri: str) -> str:
    from raycraft.config import to_dict

    cfg = sweep.config
    params = {"search": cfg.search, "scheduler": cfg.scheduler.name, "metric": cfg.metric, "mode": cfg.mode,
              "samples": cfg.samples, "concurrency": cfg.concurrency,
              **{f"space.{k}": f"{d.kind}{list(d.values)}" for k, d in sweep.space.items()},
              **{f"job.{k}": v for k, v in flatten(to_dict(sweep.kind.build(sweep.job)[0])).items()}}
    return tracking.start_run(uri, cfg.experiment, f"sweep-{cfg.name}", params,
                              {"raycraft.sweep": cfg.name, "raycraft.kind": "sweep"},
                              yaml.safe_dump(sweep_state(sweep, ""), sort_keys=False))


def sweep_state(sweep: Sweep, parent_run_id: str) -> dict[str, Any]:
    from raycraft.config import to_dict

    return {"parent_run_id": parent_run_id, "sweep": {**to_dict(sweep.config), "job": sweep.job}}


def run_sweep(sweep: Sweep, *, tracking_uri: str | None = None, address: str | None = None,
              resume: bool = False, echo: Callable[[str], None] | None = None) -> SweepOutcome:
    """Start (or with `resume`, continue) the sweep, then record the best trial on the parent run."""
    from ray import tune

    from raycraft.cluster import init_ray
    from raycraft.errors import TrainingError

    cfg = sweep.config
    uri = tracking.resolve_tracking_uri(tracking_uri)
    folder = sweep_dir(cfg.storage_path, cfg.name)
    if resume:
        state = read_yaml((folder / STATE_FILE).read_text(), str(folder / STATE_FILE))
        parent = state["parent_run_id"]
    else:
        if folder.exists():
            raise UserError(f"name: a sweep {cfg.name!r} already exists in {folder.parent}; continue it with "
                            f"`--resume {cfg.name}` or give another name (`--set name=...`).")
        parent = None
    init_ray(address)
    check_fits(sweep)
    # Tune's experiment state is written at most this often: a killed driver loses less on resume.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    if resume:
        tracking.reopen_run(uri, parent)
        tuner = tune.Tuner.restore(str(folder), trainable(sweep, parent, uri), resume_unfinished=True,
                                   resume_errored=True)
    else:
        parent = start_parent(sweep, uri)
        folder.mkdir(parents=True)
        (folder / STATE_FILE).write_text(yaml.safe_dump(sweep_state(sweep, parent), sort_keys=False))
        # the basic generator limits itself (build_search); Tune wraps the others in a limiter
        limit_by_tune = cfg.concurrency if cfg.search in ("optuna", "hyperopt") else None
        tuner = tune.Tuner(
            trainable(sweep, parent, uri),
            param_space=sweep.param_space(),
            tune_config=tune.TuneConfig(metric=cfg.metric, mode=cfg.mode, num_samples=cfg.samples,
                                        max_concurrent_trials=limit_by_tune,
                                        search_alg=build_search(sweep),
                                        scheduler=build_scheduler(sweep, uri, parent)),
            run_config=tune.RunConfig(name=cfg.name, storage_path=str(folder.parent), verbose=0,
                                      callbacks=[make_callback(uri, cfg.experiment, parent, sweep.kind.name,
                                                      echo is not None)]))
    if echo:
        echo(f"sweep {cfg.name}: MLflow parent run {parent}")
    try:
        with lifecycle.Heartbeat(uri, parent):  # Tune handles Ctrl+C itself: it saves its state and returns
            results = tuner.fit()
    except BaseException as exc:
        tracking.end_run(uri, parent, *lifecycle.ended_by(exc))
        raise
    if len(results) > results.num_terminated + results.num_errors:  # Ctrl+C: Tune saved its state and returned
        raise TrainingError(f"sweep {cfg.name!r} was interrupted; its state is saved. Continue it with "
                            f"`raycraft tune FILE --resume {cfg.name}`.")
    return summarize(sweep, uri, parent)


def summarize(sweep: Sweep, uri: str, parent: str) -> SweepOutcome:
    """Best trial, counts and plots on the parent run; the parent ends FINISHED."""
    from raycraft.sweep.plots import curves_png, metric_vs_params_png

    cfg = sweep.config
    runs = children(uri, cfg.experiment, parent)
    sign = 1 if cfg.mode == "min" else -1
    scored = [r for r in runs if cfg.metric in r.data.metrics]
    best = min(scored, key=lambda r: sign * r.data.metrics[cfg.metric]) if scored else None
    counts = {"trials": len(runs),
              "trials_finished": sum(r.info.status == "FINISHED" for r in runs),
              "trials_early_stopped": sum(r.data.tags.get(EARLY_TAG) == "true" for r in runs),
              "trials_failed": sum(r.info.status == "FAILED" for r in runs)}
    client = tracking._client(uri)
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    best_params: dict[str, Any] = {}
    metrics = [Metric(k, float(v), now, 0) for k, v in counts.items()]
    if best is not None:  # its config.yaml holds the values in force at its end (PBT changes them)
        best_config = tracking.download_text(uri, best.info.run_id, "config.yaml")
        job = read_yaml(best_config, f"run {best.info.run_id}'s config.yaml")
        best_params = {k: functools.reduce(lambda node, part: node[part], sweep.key(k).split("."), job)
                       for k in sweep.space}
        metrics.append(Metric(f"best_{cfg.metric}", best.data.metrics[cfg.metric], now, 0))
        tracking.set_tags(uri, parent, {"raycraft.best_run_id": best.info.run_id,
                                        "raycraft.best_trial": best.data.tags.get(TRIAL_TAG, ""),
                                        **{f"best.{k}": v for k, v in best_params.items()}})
        client.log_text(parent, best_config, "best_config.yaml")
    client.log_batch(parent, metrics=metrics)
    histories = {r.info.run_id: client.get_metric_history(r.info.run_id, cfg.metric) for r in runs}
    with tempfile.TemporaryDirectory() as tmp:
        metric_vs_params_png(sweep, runs, Path(tmp) / "metric_vs_params.png")
        curves_png(cfg.metric, runs, histories, Path(tmp) / "learning_curves.png", sweep.kind.curve_x)
        tracking.log_dir(uri, parent, tmp, "plots")
    tracking.end_run(uri, parent, "FINISHED")
    return SweepOutcome(cfg.name, parent, best.info.run_id if best else None,
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
