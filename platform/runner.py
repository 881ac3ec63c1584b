"""The driver: validate a job, start (or join) Ray, run the one loop with Ray Train, finish the MLflow run.

Everything that can be wrong with the user's input is checked in `prepare` before Ray starts.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from raycraft import lifecycle
from raycraft.cluster import init_ray
from raycraft.config import flatten, to_dict
from raycraft.errors import Stopped, TrainingError, UserError
from raycraft.registry import check_compatible, dataset_spec, load_dataset, model_spec
from raycraft.tracking import EPOCH_KEY
from raycraft.train.config import TrainConfig


@dataclass
class Outcome:
    run_id: str
    metrics: dict[str, float]
    tracking_uri: str
    checkpoint_path: str | None = None


def prepare(cfg: TrainConfig, address: str | None = None) -> None:
    """Checks that need no Ray: names, compatibility, files and devices."""
    check_compatible(cfg.model, cfg.dataset)
    spec = dataset_spec(cfg.dataset)
    if spec.needs_data_dir:
        if not cfg.data.data_dir:
            raise UserError(f"--data-dir: dataset {cfg.dataset!r} reads your own files; pass --data-dir PATH.")
        if not Path(cfg.data.data_dir).is_dir():
            raise UserError(f"--data-dir: {cfg.data.data_dir!r} does not exist or is not a folder.")
    if cfg.in_process and address:
        raise UserError(f"--address: an --in-process run trains in this process and joins no cluster; drop "
                        f"--address {address} or --in-process.")
    if cfg.gpu and (cfg.in_process or not (address or os.environ.get("RAY_ADDRESS"))):
        import torch

        if not torch.cuda.is_available():
            raise UserError("--gpu: no CUDA GPU is visible on this machine; drop --gpu to train on CPU, "
                            "or pass --address of a cluster with GPU nodes.")
    check_data(cfg)


def check_data(cfg: TrainConfig) -> None:
    """Open the dataset once, so that its loader validates the files, and check that the model fits it."""
    info = load_dataset(cfg.dataset, cfg.data).info
    model = model_spec(cfg.model)
    if model.task != "generative" and info.get("num_classes", 2) < 2:
        where = f" in {cfg.data.data_dir}" if cfg.data.data_dir else ""
        raise UserError(f"dataset: {cfg.dataset!r}{where} has {info['num_classes']} class "
                        f"({', '.join(info.get('class_names', []))}); {cfg.model!r} classifies, which needs "
                        "at least 2 classes.")
    if model.check:
        from raycraft.config import from_dict

        model.check(from_dict(model.config_cls, cfg.model_args), info)


def check_cluster_resources(cfg: TrainConfig) -> None:
    import ray

    total = ray.cluster_resources()
    if cfg.gpu and total.get("GPU", 0) < cfg.workers:
        raise UserError(f"--gpu: the cluster has {total.get('GPU', 0):g} GPUs; {cfg.workers} workers need "
                        f"{cfg.workers}. Lower --workers or drop --gpu.")
    need = cfg.workers * cfg.cpus_per_worker
    if not cfg.gpu and total.get("CPU", 0) < need:
        raise UserError(f"--workers: {cfg.workers} workers x {cfg.cpus_per_worker} CPUs need {need} CPUs; "
                        f"the cluster has {total.get('CPU', 0):g}. Lower --workers or cpus_per_worker.")


RUN_LEVEL_METRICS = {"startup_s", "ray_init_s", "sparsity", "imp_rounds"}
"""Logged once per run (`RunLogger.log_once`), not per epoch: kept out of the epoch lines, as are the
lottery-ticket rounds' `imp_*` metrics (their steps count pruning rounds, not epochs)."""


class Progress:
    """Reads new epochs from MLflow (where rank 0 logs them) and hands each to `on_epoch` once."""

    def __init__(self, uri: str, run_id: str, on_epoch: Callable[[dict[str, float]], None]) -> None:
        from raycraft.tracking import _client

        self.client, self.run_id, self.on_epoch = _client(uri), run_id, on_epoch
        self.seen: set[int] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def poll(self) -> None:
        steps = sorted(int(m.step) for m in self.client.get_metric_history(self.run_id, EPOCH_KEY))
        new = [s for s in steps if s not in self.seen]
        if not new:
            return
        keys = [k for k in self.client.get_run(self.run_id).data.metrics if k not in RUN_LEVEL_METRICS
                and not k.startswith(("test_", "imp_"))]
        hist = {k: {int(m.step): m.value for m in self.client.get_metric_history(self.run_id, k)} for k in keys}
        for s in new:
            self.on_epoch({k: h[s] for k, h in hist.items() if s in h})
            self.seen.add(s)

    def _loop(self) -> None:
        while not self.stop.wait(0.5):
            try:
                self.poll()
            except Exception:  # progress display must never break training
                continue

    def __enter__(self) -> Progress:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        if exc[0] is None:
            self.poll()


def _while_ray_starts(uri: str, experiment: str) -> None:
    from raycraft import tracking

    tracking.experiment_id(uri, experiment)
    import ray.train.torch  # noqa: F401

    import raycraft.train.loop  # noqa: F401


def run_training(cfg: TrainConfig, *, address: str | None = None, tracking_uri: str | None = None,
                 resume_run_id: str | None = None, run_name: str | None = None,
                 on_epoch: Callable[[dict[str, float]], None] | None = None,
                 on_start: Callable[[str], None] | None = None, started_at: float | None = None,
                 tags: dict[str, str] | None = None, callbacks: list | None = None,
                 paced_by_tune: bool = False, clone: tuple[int, str] | None = None) -> Outcome:
    """Run `cfg` on Ray Train. `started_at` (Unix time, default now) is when the user's command began: the
    run logs `startup_s`, from then to the first training batch, and `ray_init_s`, the part spent starting Ray.
    `tags` are added to a new MLflow run (a sweep's `mlflow.parentRunId`); `callbacks` are Ray Train
    callbacks (Tune's `TuneReportCallback` when this runs as a sweep trial); `paced_by_tune` makes a sweep
    trial wait for its scheduler after each epoch, and leaves the run as the sweep ended it when it stops.
    With `cfg.in_process` the loop runs in this process (Ray Train's local mode) and Ray is not started.
    `clone` = (n, checkpoint): a PBT trial's n-th exploit, which continues the resumed run from another
    trial's checkpoint as Ray Train run `<name>-pbt<n>` (whose own checkpoints then take precedence)."""
    from raycraft import tracking

    started_at = started_at or time.time()
    prepare(cfg, address)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    if cfg.init_from:
        tracking.get_run(uri, cfg.init_from)
    # MLflow's import, a new store's schema and Ray Train's import take seconds: they run while Ray starts.
    store_ready = concurrent.futures.ThreadPoolExecutor(1).submit(_while_ray_starts, uri, cfg.experiment)
    ray_init_s = 0.0
    if not cfg.in_process:
        ray_start = time.time()
        init_ray(address)
        ray_init_s = time.time() - ray_start
    store_ready.result()
    if not cfg.in_process:
        check_cluster_resources(cfg)
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from raycraft.train.loop import newest_checkpoint, train_loop_per_worker

    storage = cfg.storage_path if "://" in cfg.storage_path else str(Path(cfg.storage_path).resolve())
    run_id, ray_name, before = open_run(cfg, uri, storage, resume_run_id, run_name, tags, clone is not None)
    if clone:
        ray_name = f"{ray_name}-pbt{clone[0]}"
    if on_start:
        on_start(run_id)

    run_dir = local_run_dir(storage, ray_name)
    if cfg.in_process:  # its own start line says where it runs; Ray Train's would repeat it
        logging.getLogger("ray.train.v2.api.config").setLevel(logging.WARNING)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg), "run_id": run_id, "tracking_uri": uri,
                           "started_at": started_at, "ray_init_s": ray_init_s, "paced_by_tune": paced_by_tune,
                           "start_from": clone[1] if clone else None,
                           "run_dir": run_dir},
        scaling_config=ray.train.ScalingConfig(num_workers=0 if cfg.in_process else cfg.workers, use_gpu=cfg.gpu,
                                               resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=ray_name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            callbacks=callbacks,
            logging_config=ray.LoggingConfig(log_level="WARNING")),  # per-report INFO lines drown progress
    )
    progress = Progress(uri, run_id, on_epoch) if on_epoch else contextlib.nullcontext()
    heartbeat = lifecycle.Heartbeat(uri, run_id, enabled=lifecycle.PARENT_TAG not in (tags or {}))
    try:
        with heartbeat, lifecycle.stop_on_signals(), progress:
            result = trainer.fit() if cfg.in_process else lifecycle.watched(trainer.fit)
    except BaseException as exc:
        return attempt_stopped(exc, uri, run_id, before, paced_by_tune)
    run = tracking.get_run(uri, run_id)
    # Ray Train's local mode returns the last report's checkpoint, which is the final report's: none
    latest = newest_checkpoint(None if cfg.in_process else result.checkpoint, run_dir)[0]
    if tracking.DIVERGED_TAG in run.data.tags:
        msg = f"{run.data.tags[tracking.DIVERGED_TAG]}: training stopped. {kept_checkpoint(latest)}"
        tracking.end_attempt(uri, run_id, "FAILED", msg, before)
        raise TrainingError(msg)
    checkpoint_path = latest.path if latest else None
    if not paced_by_tune or run.info.status == "RUNNING":  # a sweep ends the runs its scheduler stopped
        tracking.end_run(uri, run_id, "FINISHED")
    return Outcome(run_id, dict(run.data.metrics), uri, checkpoint_path)


def attempt_stopped(exc: BaseException, uri: str, run_id: str, before, paced_by_tune: bool) -> Outcome:
    """End the attempt that `exc` stopped (KILLED for a signal, else FAILED) and raise what the CLI reports;
    a sweep trial that Tune tore down after its run was complete ends FINISHED instead."""
    from raycraft import tracking

    run = tracking.get_run(uri, run_id)
    if paced_by_tune and tracking.COMPLETED_TAG in run.data.tags:
        tracking.end_run(uri, run_id, "FINISHED")
        return Outcome(run_id, dict(run.data.metrics), uri, None)
    status, reason = lifecycle.ended_by(exc)
    if run.info.status == "RUNNING":  # a sweep may have ended it (KILLED) first
        tracking.end_attempt(uri, run_id, status, reason, before)
    if status == "KILLED":
        raise Stopped(getattr(exc, "signum", signal.SIGINT), run_id) from None
    raise TrainingError(str(exc) or type(exc).__name__) from exc


def open_run(cfg: TrainConfig, uri: str, storage: str, resume_run_id: str | None, run_name: str | None,
             tags: dict[str, str] | None, cloned: bool) -> tuple[str, str, object]:
    """(MLflow run id, Ray Train run name, the resumed run's RunInfo before this attempt or None): a new run,
    or the resumed one, reopened once `check_resumable` found its checkpoints usable."""
    from raycraft import tracking

    before = None  # a resumed run's RunInfo before this attempt
    if resume_run_id:
        run_id = resume_run_id
        ray_name = tracking.get_run(uri, run_id).data.tags.get("raycraft.ray_name", f"raycraft-{run_id}")
        if not cloned:
            check_resumable(run_id, local_run_dir(storage, ray_name))
        before = tracking.reopen_run(uri, run_id)
    else:
        name = run_name or f"{cfg.model}-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_id = tracking.start_run(uri, cfg.experiment, name, flatten(to_dict(cfg)),
                                    {"raycraft.model": cfg.model, "raycraft.dataset": cfg.dataset,
                                     "raycraft.storage_path": storage, **(tags or {})},
                                    yaml.safe_dump(to_dict(cfg), sort_keys=False))
        ray_name = f"raycraft-{run_id}"
        tracking.set_tags(uri, run_id, {"raycraft.ray_name": ray_name})
    return run_id, ray_name, before


def local_run_dir(storage: str, ray_name: str) -> str | None:
    """A run's checkpoint folder when storage is a local path (None for remote storage)."""
    return None if "://" in storage else str(Path(storage) / ray_name)


def check_resumable(run_id: str, run_dir: str | None) -> None:
    """Before a resume changes anything: a UserError if the run has checkpoints but none intact; a note on
    stderr for each newer one that will be skipped."""
    from raycraft.train.loop import newest_checkpoint

    chosen, skipped = newest_checkpoint(None, run_dir)
    if skipped and not chosen:
        raise UserError(f"--resume: run {run_id} has no intact checkpoint in {run_dir}: {'; '.join(skipped)}. "
                        "It cannot continue; start a new run.")
    for line in skipped:
        print(f"note: skipping checkpoint {line}; resuming from {Path(chosen.path).name}", file=sys.stderr)


def kept_checkpoint(latest) -> str:
    """What a stopped run leaves to continue from, truthfully."""
    if latest is None:
        return ("No checkpoint was written before that (nothing to resume); start again with a lower optim.lr, "
                "optim.grad_clip, or precision=fp32.")
    return (f"The last good checkpoint ({Path(latest.path).name}) is kept at {latest.path}; try a lower "
            "optim.lr, optim.grad_clip, or precision=fp32 (`--resume` continues from it).")
