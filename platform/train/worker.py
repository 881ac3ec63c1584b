"""A run on Ray Train: the trainer the driver builds (`trainer`), the function each worker runs
(`train_loop_per_worker`), and what rank 0 tells the driver or a sweep after each epoch (`EpochHook`).

A worker sets up (its shard of the data, the model, its optimizers), restores the newest intact checkpoint,
then trains epoch after epoch: each epoch is checkpointed through `ray.train.report` with an asynchronous
upload, so the loop never waits on the controller, and logged to MLflow from rank 0. After the last epoch it
finishes: test metrics and the family's artifacts. A restarted worker group resumes from the newest
checkpoint; MLflow logging skips epochs it already holds and back-fills any it missed, so a run's history has
each epoch exactly once. Each epoch that reaches MLflow also reaches the run's hooks, through Ray (never
through the MLflow store): the driver's progress display (`Progress`), and a sweep's scheduler, which rank 0
asks whether the run may go on (`raycraft.sweep.pacing`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import CheckpointUploadMode
from ray.train.torch import TorchTrainer
from ray.util.queue import Empty, Queue

from raycraft.checksums import problem
from raycraft.data.base import SPLITS
from raycraft.errors import UserError
from raycraft.plots import curves_png
from raycraft.registry import create_model, load_dataset, model_spec, step_for
from raycraft.tracking import COMPLETED_TAG, DIVERGED_TAG, GLOBAL_STEP, Run, download_artifact
from raycraft.train.config import TrainConfig
from raycraft.train.ingest import ShardConfig, StreamBatches, Streamed
from raycraft.train.loop import (
    CHECKPOINT_FILE,
    PARTIAL_PREFIX,
    Batches,
    Sums,
    Updater,
    autocast_for,
    checkpoint_name,
    evaluate,
    load_state,
    prefixed,
    progress_of,
    remove_leftovers,
    save_in_process,
    train_epoch,
    unwrap,
    write_checkpoint,
)
from raycraft.train.pruning import Ticket, find_ticket
from raycraft.train.step import Step

SKIPPED_TAG = "raycraft.skipped_checkpoints"  # newer checkpoints a restart passed over, and why
EVENT_S = 0.5  # seconds between rank 0's progress events within an epoch


class EpochHook:
    """What rank 0 tells the driver or a sweep after each epoch. Hooks travel to every worker inside
    `WorkerArgs` (so they hold only what pickles: names, Ray handles); only rank 0 calls them."""

    def logged(self, metrics: dict[str, float]) -> None:
        """An epoch's `metrics` are now in MLflow: called once per epoch of the run's history."""

    def may_continue(self, epoch: int) -> bool:
        """Whether training may go past `epoch`; asked after each epoch that another follows."""
        return True

    def stepped(self, event: dict[str, Any]) -> None:
        """Progress within an epoch (`StepClock.event`): at most every EVENT_S seconds, and at each logged step."""


@dataclass
class WorkerArgs:
    """What the driver hands every worker."""

    cfg: TrainConfig
    run_id: str
    tracking_uri: str
    run_dir: str | None
    """The run's local checkpoint folder, where an --in-process run saves its own (None: remote storage)."""
    started_at: float
    """When the user's command began: `startup_s` counts from it."""
    ray_init_s: float = 0.0
    """Seconds the command spent starting Ray."""
    start_from: str | None = None
    """A checkpoint to start from while the run has none of its own (a PBT trial taking over another's)."""
    hooks: tuple[EpochHook, ...] = ()
    streamed: Streamed | None = None
    """With Ray Data ingest (the driver built the datasets): the data's shapes and row counts."""


@dataclass
class Worker:
    """One worker's part of the run: what `set_up` builds and each epoch moves on."""

    args: WorkerArgs
    rank: int
    world: int
    device: torch.device
    info: dict[str, Any]
    step: Step
    model: torch.nn.Module
    train: Batches | StreamBatches
    val: Batches | StreamBatches
    test: Batches | StreamBatches
    full_test: Batches | StreamBatches
    """The whole test split (not a shard), for rank 0's end-of-run artifacts."""
    update: Updater
    autocast: Callable
    ddp_model: torch.nn.Module | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    steps: list[dict[str, float]] = field(default_factory=list)
    """The logged steps so far (`log_every_steps`), each with its GLOBAL_STEP."""
    position: dict[str, Any] | None = None
    """Where a mid-epoch checkpoint was taken: {"epoch", "batch" (done), "sums" (all workers' totals)}."""
    checkpointed_at: float = field(default_factory=time.monotonic)

    @property
    def cfg(self) -> TrainConfig:
        return self.args.cfg

    def new_model(self) -> torch.nn.Module:
        return create_model(self.cfg.model, self.cfg.model_config, self.info).to(self.device)


@dataclass
class Restored:
    """What `restore` found: whether it loaded a checkpoint (and whether that was this run's own), the epochs
    that came with it, and the newer checkpoints it passed over (and why)."""

    loaded: bool
    own: bool
    history: list[dict[str, float]]
    skipped: list[str]
    steps: list[dict[str, float]] = field(default_factory=list)


def train_loop_per_worker(config: dict[str, WorkerArgs]) -> None:
    """Ray Train's entry point: `config` is the trainer's `train_loop_config`, {"args": WorkerArgs}."""
    quiet_ray_train_worker_logs()
    w = set_up(config["args"])
    restored = restore(w)
    rank0 = Rank0(w, restored) if w.rank == 0 else None
    if not restored.loaded and (w.cfg.prune.sparsity or w.cfg.prune.reinit):
        find_lottery_ticket(w, rank0)
    for epoch in range(len(w.history), w.cfg.epochs):
        metrics = one_epoch(w, epoch, rank0)
        why = divergence(w, metrics, epoch)
        if why:  # every rank sees the same all-reduced values, so all stop here together
            if rank0:
                rank0.run().set_tags({DIVERGED_TAG: why})
            ray.train.report({"epoch": float(epoch)})
            return
        w.history.append(metrics)
        checkpoint(w, epoch, metrics)
        if rank0:
            rank0.log_epoch(epoch, metrics)
        if not go_on(w, rank0, epoch):
            return  # a sweep's scheduler stopped this trial
    finish(w, rank0)


def set_up(args: WorkerArgs) -> Worker:
    """This worker's shard of the data, the model and its optimizers, on this worker's device."""
    cfg = args.cfg
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.cpus_per_worker)
    device = ray.train.torch.get_device()
    batches = streamed_batches if args.streamed else loaded_batches
    info, train, val, test, full_test = batches(args, rank, world, device)
    step = step_for(model_spec(cfg.model).task)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, cfg.model_config, info).to(device)
    return Worker(args, rank, world, device, info, step, model, train, val, test, full_test,
                  Updater(step, model, cfg, len(train), device), autocast_for(cfg.precision, device))


def loaded_batches(args: WorkerArgs, rank: int, world: int, device: torch.device) -> tuple:
    """(info, train, val, test, whole test) over the dataset loaded into this worker's memory, sharded here."""
    cfg = args.cfg
    splits = load_dataset(cfg.dataset, cfg.data)
    return (splits.info, *(Batches(getattr(splits, s), cfg.batch_size, rank, world, shuffle=s == "train",
                                   seed=cfg.seed, device=device) for s in SPLITS),
            Batches(splits.test, cfg.batch_size, shuffle=False, device=device))


def streamed_batches(args: WorkerArgs, rank: int, world: int, device: torch.device) -> tuple:
    """(info, train, val, test, whole test) over this worker's Ray Data shards (`raycraft.train.ingest`); Ray
    Train has already given this rank its shards."""
    cfg, shard = args.cfg, ray.train.get_dataset_shard
    train = StreamBatches(shard("train"), args.streamed.rows["train"] // world, cfg.batch_size,
                          buffer=cfg.data.shuffle_buffer, seed=cfg.seed, device=device)
    rest = [StreamBatches(shard(s), 0, cfg.batch_size, device=device) for s in ("val", "test", "test_full")]
    return (args.streamed.info, train, *rest)


def restore(w: Worker) -> Restored:
    """Continue from the run's newest intact checkpoint; without one, from `start_from` (a PBT donor's) or
    afresh (from `--init-from` weights if given). Then the model is wrapped for data parallelism."""
    remove_leftovers(w.args.run_dir)
    checkpoint, skipped = newest_checkpoint(ray.train.get_checkpoint(), w.args.run_dir)
    if skipped and not checkpoint:
        raise RuntimeError(f"no intact checkpoint to restart from: {'; '.join(skipped)}")
    own = checkpoint is not None
    if not checkpoint and w.args.start_from:
        checkpoint = ray.train.Checkpoint(w.args.start_from)
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = load_state(d)
        w.model.load_state_dict(state["model"])
        w.update.load_state_dict(state["trainer"])
        w.history, w.steps, w.position = state["history"], state.get("steps", []), state.get("position")
        if w.position and w.rank == 0:
            print(f"resuming at batch {w.position['batch']} of epoch {w.position['epoch'] + 1}", file=sys.stderr)
        w.update.ticket = Ticket(w.model, state["masks"]) if state.get("masks") else None
    elif w.cfg.init_from:
        init_from_run(w.model, w.args.tracking_uri, w.cfg.init_from)
    torch.manual_seed(w.cfg.seed + 1000 * w.rank + len(w.history))  # dropout differs per rank and epoch
    w.ddp_model = (w.step.distribute(w.model, lambda m: ray.train.torch.prepare_model(m, move_to_device=False))
                   if w.world > 1 else w.model)
    return Restored(checkpoint is not None, own, list(w.history), skipped, list(w.steps))


def init_from_run(model: torch.nn.Module, uri: str, run_id: str) -> None:
    """Load run `run_id`'s final weights into `model`. Parameters only the new model has (adapters) keep
    their initialisation; a weight the new model lacks means a different architecture, and fails."""
    with tempfile.TemporaryDirectory() as tmp:
        state = load_state(download_artifact(uri, run_id, f"checkpoint/{CHECKPOINT_FILE}", tmp).parent)
    result = model.load_state_dict(state["model"], strict=False)
    if result.unexpected_keys:
        raise ValueError(f"--init-from {run_id}: its weights {result.unexpected_keys[:5]} have no place in this "
                         "model; fine-tune a run of the same model and size.")


class Rank0:
    """What rank 0 alone does: log to MLflow and tell the hooks. MLflow's import takes seconds of CPU, so the
    run's `tracking.Run` is made on a thread once set-up is done (started earlier, it competes for the GIL
    with data loading and model building) and waited for at its first use, which first back-fills the epochs
    a killed worker checkpointed but never logged."""

    def __init__(self, w: Worker, restored: Restored) -> None:
        self.w, self.restored, self._run = w, restored, None
        self.future = concurrent.futures.ThreadPoolExecutor(1).submit(Run, w.args.tracking_uri, w.args.run_id)
        self.training_starts_at = time.time()

    def run(self) -> Run:
        if self._run is None:
            self._run = self.future.result()
            for metrics in self.restored.history:
                self.record(metrics)
            for metrics in self.restored.steps:
                self._run.log_step(metrics)
            if self.restored.own:
                self._run.note_restore(len(self.restored.history))
            if self.restored.skipped:
                self._run.set_tags({SKIPPED_TAG: "; ".join(self.restored.skipped)})
        return self._run

    def record(self, metrics: dict[str, float]) -> None:
        """An epoch into MLflow unless it is there already, and then to the hooks."""
        if self.run().log_epoch(metrics):
            for hook in self.w.args.hooks:
                hook.logged(metrics)

    def log_step(self, metrics: dict[str, float]) -> None:
        """A logged step into MLflow (unless it is there already), and to the hooks as a progress event."""
        self.run().log_step(metrics)

    def event(self, event: dict[str, Any]) -> None:
        for hook in self.w.args.hooks:
            hook.stepped(event)

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """The epoch, after a fresh run's first its start-up figures, and the family's per-epoch artifacts."""
        if epoch == 0:  # only a fresh run's start-up is the user's wait
            self.run().log_metrics({"startup_s": self.training_starts_at - self.w.args.started_at,
                                    "ray_init_s": self.w.args.ray_init_s})
        self.record(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            self.w.step.epoch_artifacts(unwrap(self.w.model), epoch, self.w.info, Path(tmp))
            if any(Path(tmp).iterdir()):
                self.run().log_artifacts(tmp, f"epochs/epoch_{epoch:04d}")

    def may_continue(self, epoch: int) -> bool:
        return all(hook.may_continue(epoch) for hook in self.w.args.hooks)


def find_lottery_ticket(w: Worker, rank0: Rank0 | None) -> None:
    """Before the epochs: iterative magnitude pruning (`cfg.prune`, see `train.pruning`) finds the ticket the
    run then trains; rank 0 logs each round's network at the sparsity it trained with."""

    def train_round(ticket: Ticket, after_epoch) -> dict[str, float]:
        round_update = Updater(w.step, w.model, w.cfg, len(w.train), w.device, ticket)
        for epoch in range(w.cfg.epochs):
            train_epoch(w.step, w.model, w.ddp_model, w.train, round_update, w.autocast, epoch)
            after_epoch(epoch)
        return evaluate(w.step, w.model, w.val, w.autocast)

    def fresh_state() -> dict[str, torch.Tensor]:
        torch.manual_seed(w.cfg.seed + 1)
        return w.new_model().state_dict()

    w.update.ticket, rounds = find_ticket(w.model, w.cfg.prune, train_round, fresh_state)
    if rank0:
        for r, (sparsity, val_metrics) in enumerate(rounds):
            rank0.run().log_metrics({"imp_sparsity": sparsity, **prefixed(val_metrics, "imp_val_")}, step=r)
        rank0.run().log_metrics({"sparsity": w.update.ticket.sparsity(), "imp_rounds": float(len(rounds))})


def one_epoch(w: Worker, epoch: int, rank0: Rank0 | None) -> dict[str, float]:
    """Train on this worker's shard (what is left of it, resuming mid-epoch), then evaluate on validation: the
    epoch's metrics, the same on every rank."""
    start = time.perf_counter()
    resumed = w.position if w.position and w.position["epoch"] == epoch else None
    w.train.skip = resumed["batch"] if resumed else 0
    sums = Sums({k: torch.tensor(v if w.rank == 0 else 0.0, dtype=torch.float64, device=w.device)
                 for k, v in resumed["sums"].items()}) if resumed else None  # rank 0 holds the workers' totals
    clock = StepClock(w, epoch, rank0)
    train_metrics = train_epoch(w.step, w.model, w.ddp_model, w.train, w.update, w.autocast, epoch, clock, sums)
    w.train.skip, w.position = 0, None
    train_time = time.perf_counter() - start
    return {"epoch": float(epoch), **prefixed(train_metrics, "train_"),
            **prefixed(evaluate(w.step, w.model, w.val, w.autocast), "val_"),
            "lr": w.update.lr(), "epoch_time": time.perf_counter() - start,
            "samples_per_s": clock.samples * w.world / train_time}


class StepClock:
    """What happens after each training batch: every `log_every_steps` global steps, the interval's metrics
    (all workers' means) are logged; every EVENT_S seconds rank 0 sends a progress event (its own figures);
    every `checkpoint_every_steps` steps or `checkpoint_every_minutes`, a mid-epoch checkpoint."""

    def __init__(self, w: Worker, epoch: int, rank0: Rank0 | None) -> None:
        self.w, self.epoch, self.rank0, self.per_epoch = w, epoch, rank0, len(w.train)
        self.interval, self.samples, self.since = Sums(), 0.0, 0.0
        self.evented = time.perf_counter()

    def __call__(self, batch: int, batch_sums: dict[str, torch.Tensor], sums: Sums) -> None:
        cfg, n = self.w.cfg, float(batch_sums["n"])
        self.samples, self.since = self.samples + n, self.since + n
        self.interval.add(batch_sums)
        global_step = self.epoch * self.per_epoch + batch
        if cfg.log_every_steps and global_step % cfg.log_every_steps == 0:
            self.log(batch, global_step)
        elif self.rank0 and time.perf_counter() - self.evented >= EVENT_S:
            self.rank0.event(self.event(batch, self.interval.means(everywhere=False), log=False))
        if batch < self.per_epoch and self.checkpoint_due(global_step):
            step_checkpoint(self.w, self.epoch, batch, sums)

    def event(self, batch: int, means: dict[str, float], log: bool) -> dict[str, Any]:
        now = time.perf_counter()
        rate = self.since * self.w.world / max(now - self.evented, 1e-9)
        self.evented, self.since = now, 0.0
        loss = means.get("loss", next((v for k, v in means.items() if k.endswith("loss")), math.nan))
        return {"epoch": self.epoch, "step": batch, "steps": self.per_epoch, "samples_per_s": rate,
                "loss": loss, "log": log}

    def log(self, batch: int, global_step: int) -> None:
        """The interval's means over all workers (a collective: every rank reaches the same steps)."""
        means = self.w.step.finalize(self.interval.means())
        self.interval = Sums()
        event = self.event(batch, means, log=True)
        metrics = {GLOBAL_STEP: float(global_step), **prefixed(means, "step_train_"),
                   "step_lr": self.w.update.lr(), "step_samples_per_s": event["samples_per_s"]}
        self.w.steps.append(metrics)
        if self.rank0:
            self.rank0.log_step(metrics)
            self.rank0.event(event)

    def checkpoint_due(self, global_step: int) -> bool:
        """The same answer on every rank: a step count, or rank 0's clock broadcast."""
        cfg = self.w.cfg
        if cfg.checkpoint_every_steps and global_step % cfg.checkpoint_every_steps == 0:
            return True
        if not cfg.checkpoint_every_minutes:
            return False
        due = torch.tensor([float(time.monotonic() - self.w.checkpointed_at >= 60 * cfg.checkpoint_every_minutes)],
                           device=self.w.device)
        if self.w.world > 1:
            dist.broadcast(due, 0)
        return bool(due.item())


def divergence(w: Worker, metrics: dict[str, float], epoch: int) -> str | None:
    """Why the epoch ends the attempt (a non-finite metric, or the divergence guard on any worker), or None."""
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    guard = w.update.diverged()  # a collective: every rank asks every epoch
    if bad:
        return f"non-finite {', '.join(bad)} in epoch {epoch + 1}"
    return f"diverged in epoch {epoch + 1} ({guard})" if guard else None


def checkpoint(w: Worker, epoch: int, metrics: dict[str, float], batch: int | None = None,
               position: dict[str, Any] | None = None) -> None:
    """Report the epoch (or `batch` batches into it) with its checkpoint, which rank 0 writes; Ray Train uploads
    it in the background and deletes the folder when done. An --in-process run keeps the folder itself
    (`save_in_process`)."""
    folder = Path(tempfile.mkdtemp(prefix=f"{PARTIAL_PREFIX}{os.getpid()}-")) if w.rank == 0 else None
    name = checkpoint_name(epoch, batch)
    if folder:
        write_checkpoint(w.model, w.update, w.history, folder, {"steps": w.steps, "position": position})
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)) if folder else None,
                     checkpoint_dir_name=name, checkpoint_upload_mode=CheckpointUploadMode.ASYNC)
    if folder and w.cfg.in_process:
        save_in_process(folder, Path(w.args.run_dir), name, w.cfg.keep_checkpoints)
    w.checkpointed_at = time.monotonic()


def step_checkpoint(w: Worker, epoch: int, batch: int, sums: Sums) -> None:
    """A mid-epoch checkpoint: the epoch's sums so far, added over workers (a collective), travel with it, so
    the resumed epoch's metrics are those of the whole epoch."""
    position = {"epoch": epoch, "batch": batch, "sums": sums.reduced()}
    checkpoint(w, epoch, {"epoch": float(epoch), "batch": float(batch)}, batch, position)


def go_on(w: Worker, rank0: Rank0 | None, epoch: int) -> bool:
    """Whether the run goes past `epoch`: rank 0 asks the hooks, every rank follows its answer."""
    if not w.args.hooks or epoch == w.cfg.epochs - 1:
        return True
    go = torch.tensor([float(rank0.may_continue(epoch)) if rank0 else 0.0], device=w.device)
    if w.world > 1:
        dist.broadcast(go, 0)
    return bool(go.item())


def finish(w: Worker, rank0: Rank0 | None) -> None:
    """After the last epoch: the test metrics, which the final report carries, and rank 0's record of the
    finished run (then marked complete: a sweep that tears the trial down after this keeps it FINISHED)."""
    final = {**w.history[-1], **prefixed(evaluate(w.step, w.model, w.test, w.autocast), "test_")}
    if rank0:
        log_finished(w, rank0.run(), final)
    ray.train.report({**final, "done": 1.0})


def log_finished(w: Worker, run: Run, final: dict[str, float]) -> None:
    """Test metrics, learning curves, the family's end-of-run artifacts, the final checkpoint and the model,
    which carries the final metrics (the last epoch's, the test split's and the end-of-run ones)."""
    run.log_metrics({k: v for k, v in final.items() if k.startswith("test_")})
    model = unwrap(w.model)
    with tempfile.TemporaryDirectory() as tmp:
        curves_png(w.history, Path(tmp) / "curves.png")
        with w.autocast():
            end_metrics = w.step.artifacts(model.eval(), w.full_test, w.info, Path(tmp))
        if end_metrics:
            run.log_metrics(end_metrics)
        run.log_artifacts(tmp, "plots")
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(w.model, w.update, w.history, Path(tmp))
        run.log_artifacts(tmp, "checkpoint")
    example = w.step.example_input(next(iter(w.full_test)))
    if example is not None:
        run.log_model(model, example, [*final, *(end_metrics or {})], w.step.class_names(w.info),
                      model_about(w, example))
    run.set_tags({COMPLETED_TAG: "true"})


def model_about(w: Worker, example: torch.Tensor) -> str:
    """The logged model's description: what it is, and the input it takes (shape, type and scale)."""
    dims = ", ".join(["batch", *map(str, example.shape[1:])])
    return (f"{w.cfg.model} trained by raycraft on {w.cfg.dataset} for {len(w.history)} epochs. Input: "
            f"{str(example.dtype).removeprefix('torch.')} tensors of shape ({dims}): {w.step.input_about(w.info)}.")


def quiet_ray_train_worker_logs() -> None:
    """Ray Train's per-report INFO line comes from a logger named by its file path, which escapes the
    run's `ray.train` log level (in local mode, from `train_fn_utils`); raise those loggers to WARNING so
    progress lines stay readable."""
    for name in list(logging.root.manager.loggerDict):
        if name.endswith(os.path.join("execution", "context.py")):
            logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray.train.v2._internal.execution.train_fn_utils").setLevel(logging.WARNING)  # local mode
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # a line per execution of each split, every epoch
    logging.getLogger("botocore").setLevel(logging.WARNING)  # "Found credentials in environment variables."


def newest_checkpoint(reported: ray.train.Checkpoint | None, run_dir: str | None):
    """(checkpoint, skipped): the newest intact checkpoint among Ray Train's latest (`reported`) and every
    `epoch_*` folder in `run_dir` (Ray Train's, whether or not its record of them was written before a kill,
    and an --in-process run's own: a run may switch modes across --resume), and a line for each newer one
    that failed its manifest (`raycraft.checksums`), naming it and why."""
    found = {reported.path: reported} if reported else {}
    if run_dir and Path(run_dir).is_dir():
        for folder in Path(run_dir).glob("epoch_*"):
            found.setdefault(str(folder), ray.train.Checkpoint(str(folder)))
    skipped = []
    for checkpoint in sorted(found.values(), key=lambda c: progress_of(c.path), reverse=True):
        with checkpoint.as_directory() as d:
            why = problem(d)
        if why is None:
            return checkpoint, skipped
        skipped.append(f"{Path(checkpoint.path).name} ({why})")
    return None, skipped


def check_resumable(run_id: str, run_dir: str | None) -> None:
    """Before a resume changes anything: a UserError if the run has checkpoints but none intact; a note on
    stderr for each newer one that will be skipped."""
    chosen, skipped = newest_checkpoint(None, run_dir)
    if skipped and not chosen:
        raise UserError(f"--resume: run {run_id} has no intact checkpoint in {run_dir}: {'; '.join(skipped)}. "
                        "It cannot continue; start a new run.")
    for line in skipped:
        print(f"note: skipping checkpoint {line}; resuming from {Path(chosen.path).name}", file=sys.stderr)


def trainer(args: WorkerArgs, ray_name: str, storage: str, callbacks: list,
            datasets: dict[str, Any] | None = None) -> TorchTrainer:
    """Ray Train's trainer of the run: `cfg.workers` workers, or with `cfg.in_process` Ray Train's local mode,
    where the loop runs in the driver's own process. `callbacks` run in Ray Train's controller; `datasets`
    (train, val, test), when given, are Ray Data datasets shared among the workers by `ShardConfig`."""
    cfg = args.cfg
    if cfg.in_process:  # its own start line says where it runs; Ray Train's would repeat it
        logging.getLogger("ray.train.v2.api.config").setLevel(logging.WARNING)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"args": args},
        datasets=datasets, dataset_config=ShardConfig() if datasets else None,
        scaling_config=ray.train.ScalingConfig(num_workers=0 if cfg.in_process else cfg.workers, use_gpu=cfg.gpu,
                                               resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=ray_name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            callbacks=callbacks,
            logging_config=ray.LoggingConfig(log_level="WARNING")),  # per-report INFO lines drown progress
    )


class _Calls(EpochHook):
    """An --in-process run's progress: the loop runs in the driver's process, so a plain call."""

    def __init__(self, report: Callable[[str, dict[str, Any]], None]) -> None:
        self.report = report

    def logged(self, metrics: dict[str, float]) -> None:
        self.report("epoch", metrics)

    def stepped(self, event: dict[str, Any]) -> None:
        self.report("step", event)


class _Puts(EpochHook):
    """Rank 0's side of `Progress`: each epoch and progress event onto the driver's Ray queue."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    def logged(self, metrics: dict[str, float]) -> None:
        self._put(("epoch", metrics), timeout=10)

    def stepped(self, event: dict[str, Any]) -> None:
        self._put(("step", event), timeout=1)

    def _put(self, item: tuple[str, dict[str, Any]], timeout: float) -> None:
        with contextlib.suppress(Exception):  # the progress display must never break training
            self.queue.put(item, timeout=timeout)


class Progress:
    """While entered, hands each epoch rank 0 logs to `on_epoch` and each progress event to `on_step` in the
    driver: through a Ray queue (a small actor) that rank 0 puts on and a thread here reads, or by a direct call
    when the loop runs in this process. `hook` goes into `WorkerArgs.hooks`."""

    def __init__(self, on_epoch: Callable[[dict[str, float]], None] | None, in_process: bool,
                 on_step: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.callbacks = {"epoch": on_epoch, "step": on_step}
        self.queue = None if in_process else Queue(actor_options={"num_cpus": 0})
        self.hook = _Calls(self.report) if self.queue is None else _Puts(self.queue)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._read, name="raycraft-progress", daemon=True)

    def report(self, kind: str, payload: dict[str, Any]) -> None:
        if self.callbacks[kind]:
            self.callbacks[kind](payload)

    def _read(self) -> None:
        while not self.stop.is_set():
            try:
                self.report(*self.queue.get(timeout=0.5))
            except Empty:
                continue
            except Exception:  # the progress display must never break training
                time.sleep(0.5)

    def __enter__(self) -> Progress:
        if self.queue is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.queue is None:
            return
        self.stop.set()
        self.thread.join()
        with contextlib.suppress(Exception):
            if exc[0] is None:  # the epochs put since the thread's last read
                for item in self.queue.get_nowait_batch(self.queue.qsize()):
                    self.report(*item)
            self.queue.shutdown()
