"""The driver: validate a job, start (or join) Ray, run the one loop with Ray Train, finish the MLflow run.

Everything that can be wrong with the user's input is checked in `prepare` before Ray starts. Ray Train's side
of the run (the trainer, the workers' loop, the progress they send back) is `raycraft.train.worker`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from raycraft import lifecycle, storage, tracking
from raycraft.cluster import init_ray
from raycraft.config import flatten, to_dict
from raycraft.data.base import SPLITS
from raycraft.errors import Stopped, TrainingError, UserError
from raycraft.registry import check_compatible, dataset_spec, load_dataset, model_spec
from raycraft.train.config import TrainConfig

DATA_CPUS = 1  # CPUs a streamed run keeps free of trainers, for Ray Data's reading and decoding tasks


@dataclass
class Outcome:
    run_id: str
    metrics: dict[str, float]
    tracking_uri: str
    checkpoint_path: str | None = None


def prepare(cfg: TrainConfig, address: str | None = None) -> Any:
    """Checks that need no Ray: names, compatibility, files and devices. With Ray Data ingest, the dataset's
    `raycraft.data.streams.Source`, which lists its files without reading them; None otherwise."""
    check_compatible(cfg.model, cfg.dataset)
    spec = dataset_spec(cfg.dataset)
    if spec.needs_data_dir:
        if not cfg.data.data_dir:
            raise UserError(f"--data-dir: dataset {cfg.dataset!r} reads your own files; pass --data-dir PATH.")
        if not storage.is_remote(cfg.data.data_dir) and not Path(cfg.data.data_dir).is_dir():
            raise UserError(f"--data-dir: {cfg.data.data_dir!r} does not exist or is not a folder.")
    if cfg.data.data_dir and storage.is_remote(cfg.data.data_dir):
        storage.check_readable("--data-dir", cfg.data.data_dir)
    if storage.is_remote(cfg.storage_path):
        storage.check_writable("storage_path", cfg.storage_path)
    if cfg.artifact_root:
        tracking.check_artifact_root(cfg.artifact_root)
    if cfg.in_process and address:
        raise UserError(f"--address: an --in-process run trains in this process and joins no cluster; drop "
                        f"--address {address} or --in-process.")
    if cfg.gpu and (cfg.in_process or not (address or os.environ.get("RAY_ADDRESS"))):
        import torch  # deferred: 1 s to import, and only --gpu needs it before Ray starts

        if not torch.cuda.is_available():
            raise UserError("--gpu: no CUDA GPU is visible on this machine; drop --gpu to train on CPU, "
                            "or pass --address of a cluster with GPU nodes.")
    return check_data(cfg)


def ingest_of(cfg: TrainConfig) -> str:
    """`data.ingest` resolved: `auto` streams the datasets read from files, except in an --in-process run."""
    if cfg.data.ingest == "auto":
        return "ray_data" if dataset_spec(cfg.dataset).streams and not cfg.in_process else "memory"
    if cfg.data.ingest == "ray_data" and cfg.in_process:
        raise UserError("data.ingest: ray_data streams through Ray Data's tasks, which an --in-process run does "
                        "not start; drop --in-process or set data.ingest=memory (or auto).")
    return cfg.data.ingest


def open_source(cfg: TrainConfig) -> Any:
    """The dataset as Ray Data streams it: its files listed and checked, its shapes read, nothing loaded (a
    shipped in-memory dataset is loaded here, then put into the object store)."""
    from raycraft.data import streams  # deferred: Ray Data's import, for streamed runs only

    if not dataset_spec(cfg.dataset).streams:
        return streams.from_memory(load_dataset(cfg.dataset, cfg.data))
    source = streams.SOURCES[cfg.dataset](cfg.data)
    source.keep_train_fraction(cfg.data.train_fraction)
    source.info.update(dataset=cfg.dataset, data_dir=cfg.data.data_dir)
    return source


def check_data(cfg: TrainConfig) -> Any:
    """Open the dataset once (in memory, or as a Ray Data source), so that its reader validates the files, and
    check that the model fits it. The source, with Ray Data ingest."""
    source = open_source(cfg) if ingest_of(cfg) == "ray_data" else None
    info = source.info if source else load_dataset(cfg.dataset, cfg.data).info
    model = model_spec(cfg.model)
    if model.task != "generative" and info.get("num_classes", 2) < 2:
        where = f" in {cfg.data.data_dir}" if cfg.data.data_dir else ""
        raise UserError(f"dataset: {cfg.dataset!r}{where} has {info['num_classes']} class "
                        f"({', '.join(info.get('class_names', []))}); {cfg.model!r} classifies, which needs "
                        "at least 2 classes.")
    if model.check:
        model.check(cfg.model_config, info)
    return source


def check_cluster_resources(cfg: TrainConfig, streamed: bool = False) -> None:
    """Once Ray is up: a UserError unless the cluster has the GPUs or CPUs for the run's workers, and, for a
    streamed run, a CPU besides for Ray Data's reading tasks."""
    import ray  # deferred: this module is imported before the input is checked; by now Ray is running

    total = ray.cluster_resources()
    if cfg.gpu and total.get("GPU", 0) < cfg.workers:
        raise UserError(f"--gpu: the cluster has {total.get('GPU', 0):g} GPUs; {cfg.workers} workers need "
                        f"{cfg.workers}. Lower --workers or drop --gpu.")
    need = (0 if cfg.gpu else cfg.workers * cfg.cpus_per_worker) + DATA_CPUS * streamed
    if total.get("CPU", 0) < need:
        reading = f" and {DATA_CPUS} for Ray Data's reading tasks" if streamed else ""
        raise UserError(f"--workers: {cfg.workers} workers x {cfg.cpus_per_worker} CPUs{reading} need {need} CPUs; "
                        f"the cluster has {total.get('CPU', 0):g}. Lower --workers or cpus_per_worker"
                        f"{', or set data.ingest=memory' if streamed else ''}.")


@dataclass
class Trial:
    """A run as one trial of a sweep, which `raycraft.sweep` builds: Ray Train `callbacks` (Tune's report of
    each epoch), rank 0's `hooks` (the wait for the scheduler's verdict after each epoch), and a PBT exploit's
    `clone` = (n, checkpoint), which continues the run from another trial's checkpoint as Ray Train run
    `<name>-pbt<n>` (whose own checkpoints then take precedence). The sweep, not the run, ends a run whose
    trial its scheduler stopped; a trial torn down after its run completed ends FINISHED."""

    callbacks: list = field(default_factory=list)
    hooks: tuple = ()
    clone: tuple[int, str] | None = None


def _while_ray_starts(uri: str, experiment: str, artifact_root: str | None) -> ModuleType:
    """MLflow's import, a new store's schema and Ray Train's import take seconds: they run on a thread while
    Ray starts (docs/overhead.md). Returns `raycraft.train.worker`, the run's Ray Train side."""
    tracking.experiment_id(uri, experiment, artifact_root)
    from raycraft.train import worker  # deferred: Ray Train and torch, imported here beside ray.init

    return worker


def start_ray(cfg: TrainConfig, uri: str, address: str | None, streamed: bool) -> tuple[ModuleType, float]:
    """Start (or join) Ray unless the run is --in-process, with `_while_ray_starts` beside it: (its
    `raycraft.train.worker`, the seconds ray.init took)."""
    store_ready = concurrent.futures.ThreadPoolExecutor(1).submit(_while_ray_starts, uri, cfg.experiment,
                                                                  cfg.artifact_root)
    ray_init_s = 0.0
    if not cfg.in_process:
        ray_start = time.time()
        init_ray(address, cfg.workers * cfg.cpus_per_worker + DATA_CPUS if streamed else 0)
        ray_init_s = time.time() - ray_start
    worker = store_ready.result()
    if not cfg.in_process:
        check_cluster_resources(cfg, streamed)
    return worker, ray_init_s


def run_training(cfg: TrainConfig, *, address: str | None = None, tracking_uri: str | None = None,
                 resume_run_id: str | None = None, run_name: str | None = None,
                 on_epoch: Callable[[dict[str, float]], None] | None = None,
                 on_step: Callable[[dict[str, Any]], None] | None = None,
                 on_start: Callable[[str], None] | None = None, started_at: float | None = None,
                 tags: dict[str, str] | None = None, trial: Trial | None = None) -> Outcome:
    """Run `cfg` on Ray Train. `started_at` (Unix time, default now) is when the user's command began: the
    run logs `startup_s`, from then to the first training batch, and `ray_init_s`, the part spent starting Ray.
    `on_epoch` gets each epoch's metrics as rank 0 logs them, `on_step` its progress events within an epoch
    (`raycraft.train.worker.StepClock`); `tags` are added to a new MLflow run (a sweep's
    `mlflow.parentRunId`); `trial`: the run is a sweep's trial. With `cfg.in_process` the loop runs in this
    process (Ray Train's local mode) and Ray is not started."""
    started_at = started_at or time.time()
    source = prepare(cfg, address)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    if cfg.init_from:
        tracking.get_run(uri, cfg.init_from)
    worker, ray_init_s = start_ray(cfg, uri, address, source is not None)
    storage = cfg.storage_path if "://" in cfg.storage_path else str(Path(cfg.storage_path).resolve())
    if resume_run_id and not (trial and trial.clone):
        worker.check_resumable(resume_run_id, local_run_dir(storage, ray_name_of(uri, resume_run_id)))
    ingest = {"raycraft.ingest": "ray_data" if source else "memory"}
    run, ray_name = open_run(cfg, uri, storage, resume_run_id, run_name, {**(tags or {}), **ingest}, trial)
    if on_start:
        on_start(run.run_id)
    run_dir = local_run_dir(storage, ray_name)
    progress = worker.Progress(on_epoch, cfg.in_process, on_step) if on_epoch or on_step else None
    args = worker.WorkerArgs(cfg, run.run_id, uri, run_dir, started_at, ray_init_s,
                             start_from=trial.clone[1] if trial and trial.clone else None,
                             hooks=(*(trial.hooks if trial else ()), *([progress.hook] if progress else [])),
                             streamed=worker.Streamed(source.info, source.rows) if source else None)
    fit = worker.trainer(args, ray_name, storage, trial.callbacks if trial else [],
                         source.datasets() if source else None).fit
    try:
        with run.heartbeat(cfg.system_metrics), lifecycle.stop_on_signals(), progress or contextlib.nullcontext():
            result = fit() if cfg.in_process else lifecycle.watched(fit)
    except BaseException as exc:
        return attempt_stopped(exc, run, trial)
    # Ray Train's local mode returns the last report's checkpoint, which is the final report's: none
    latest = worker.newest_checkpoint(None if cfg.in_process else result.checkpoint, run_dir)[0]
    return attempt_ended(run, latest, trial)


def attempt_ended(run: tracking.Run, latest: Any, trial: Trial | None) -> Outcome:
    """After Ray Train's run returned: a diverged attempt fails, saying what is left to resume from; a
    completed run ends FINISHED. A trial that its scheduler stopped did not complete: its sweep ends it."""
    now = run.fetch()
    if tracking.DIVERGED_TAG in now.data.tags:
        msg = f"{now.data.tags[tracking.DIVERGED_TAG]}: training stopped. {kept_checkpoint(latest)}"
        run.end("FAILED", msg)
        raise TrainingError(msg)
    if trial is None or (tracking.COMPLETED_TAG in now.data.tags and now.info.status == "RUNNING"):
        run.end("FINISHED")
    return Outcome(run.run_id, dict(now.data.metrics), run.uri, latest.path if latest else None)


def attempt_stopped(exc: BaseException, run: tracking.Run, trial: Trial | None) -> Outcome:
    """End the attempt that `exc` stopped (KILLED for a signal, else FAILED) and raise what the CLI reports;
    a sweep trial that Tune tore down after its run was complete ends FINISHED instead."""
    now = run.fetch()
    if trial is not None and tracking.COMPLETED_TAG in now.data.tags:
        run.end("FINISHED")
        return Outcome(run.run_id, dict(now.data.metrics), run.uri, None)
    if run.end_with(exc) == "KILLED":
        raise Stopped(getattr(exc, "signum", signal.SIGINT), run.run_id) from None
    raise TrainingError(str(exc) or type(exc).__name__) from exc


def ray_name_of(uri: str, run_id: str) -> str:
    """The Ray Train run (its checkpoint folder's name) of an MLflow run."""
    return tracking.get_run(uri, run_id).data.tags.get("raycraft.ray_name", f"raycraft-{run_id}")


def open_run(cfg: TrainConfig, uri: str, storage: str, resume_run_id: str | None, run_name: str | None,
             tags: dict[str, str] | None, trial: Trial | None) -> tuple[tracking.Run, str]:
    """(the MLflow run, its Ray Train run's name): a new run, with its dataset's splits as inputs, or the
    resumed one, reopened."""
    if resume_run_id:
        run, ray_name = tracking.Run.resume(uri, resume_run_id), ray_name_of(uri, resume_run_id)
    else:
        name = run_name or f"{cfg.model}-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
        run = tracking.Run.start(uri, cfg.experiment, name, flatten(to_dict(cfg)),
                                 {"raycraft.model": cfg.model, "raycraft.dataset": cfg.dataset,
                                  "raycraft.storage_path": storage, **(tags or {})},
                                 yaml.safe_dump(to_dict(cfg), sort_keys=False))
        ray_name = f"raycraft-{run.run_id}"
        run.set_tags({"raycraft.ray_name": ray_name})
        run.log_datasets(cfg.dataset, cfg.data.data_dir, to_dict(cfg.data), SPLITS)
    return run, f"{ray_name}-pbt{trial.clone[0]}" if trial and trial.clone else ray_name


def local_run_dir(storage: str, ray_name: str) -> str | None:
    """A run's checkpoint folder when storage is a local path (None for remote storage)."""
    return None if "://" in storage else str(Path(storage) / ray_name)


def kept_checkpoint(latest) -> str:
    """What a stopped run leaves to continue from, truthfully."""
    if latest is None:
        return ("No checkpoint was written before that (nothing to resume); start again with a lower optim.lr, "
                "optim.grad_clip, or precision=fp32.")
    return (f"The last good checkpoint ({Path(latest.path).name}) is kept at {latest.path}; try a lower "
            "optim.lr, optim.grad_clip, or precision=fp32 (`--resume` continues from it).")
