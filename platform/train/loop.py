"""The one training loop. Every Ray Train worker runs `train_loop_per_worker`; a family plugs in a `Step`.

Per epoch: train on this worker's shard, sum metrics and all-reduce them, evaluate on validation,
checkpoint (model, optimizers, schedules, history) through `ray.train.report` with an asynchronous
upload so the loop never waits on the controller, and log the epoch to MLflow from rank 0. After the
last epoch: test metrics and the family's artifacts. A restarted worker group resumes from the newest
checkpoint; MLflow logging skips epochs it already holds and back-fills any it missed, so a run's
history has each epoch exactly once.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from raycraft.config import from_dict
from raycraft.registry import create_model, load_dataset, model_spec, step_for
from raycraft.train.config import TrainConfig
from raycraft.train.guard import DivergenceGuard
from raycraft.train.optim import build_optimizer, build_scheduler, l1_penalty
from raycraft.train.pruning import Ticket, find_ticket
from raycraft.train.step import Step

CHECKPOINT_FILE = "state.pt"
SKIPPED_TAG = "raycraft.skipped_checkpoints"  # newer checkpoints a restart passed over, and why
IN_PROCESS_MARK = "saved_in_process"
"""A file in each checkpoint folder an --in-process run wrote itself (Ray Train's local mode keeps reported
checkpoints in memory only); resume finds these beside Ray Train's own, and pruning touches only these."""


class Batches:
    """Index batches over an in-memory dataset, sharded across `world` ranks.

    Training shards pad the permutation to a multiple of `world` (as DistributedSampler does) so every
    rank takes the same number of steps; evaluation shards are disjoint and unpadded so summed metrics
    count each example exactly once.
    """

    def __init__(self, data: Dataset, batch_size: int, rank: int = 0, world: int = 1, *, shuffle: bool,
                 seed: int = 0, device: torch.device | str = "cpu") -> None:
        self.data, self.batch_size, self.rank, self.world = data, batch_size, rank, world
        self.shuffle, self.seed, self.device = shuffle, seed, torch.device(device)
        self.epoch = 0

    def indices(self) -> torch.Tensor:
        n = len(self.data)
        if not self.shuffle:
            return torch.arange(n)[self.rank::self.world]
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        pad = (-n) % self.world
        order = torch.cat([order, order[:pad]])
        return order[self.rank::self.world]

    def __len__(self) -> int:
        return math.ceil(len(self.indices()) / self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        idx = self.indices()
        for start in range(0, len(idx), self.batch_size):
            batch = self.data[idx[start:start + self.batch_size]]
            yield tuple(t.to(self.device, non_blocking=True) for t in batch)


class Sums:
    """Running per-example sums of a step's metrics, reduced over workers into means."""

    def __init__(self) -> None:
        self.totals: dict[str, torch.Tensor] = {}

    def add(self, sums: dict[str, torch.Tensor]) -> None:
        for k, v in sums.items():
            v = v.detach().double()
            self.totals[k] = self.totals[k] + v if k in self.totals else v

    def means(self) -> dict[str, float]:
        """Sum over all workers, then divide by the total example count 'n'."""
        if not self.totals:
            return {}
        keys = sorted(self.totals)
        vec = torch.stack([self.totals[k].cpu() for k in keys])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(vec)
        totals = dict(zip(keys, vec.tolist(), strict=True))
        n = max(totals.pop("n"), 1.0)
        return {k: v / n for k, v in totals.items()}


def prefixed(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {f"{prefix}{k}": v for k, v in metrics.items()}


def set_training(model: torch.nn.Module, mode: bool) -> None:
    try:
        model.train(mode)
    except NotImplementedError:  # a torch.export graph (MLflow's pt2 format) is frozen in eval mode
        pass


def evaluate(step: Step, model: torch.nn.Module, batches: Batches, autocast) -> dict[str, float]:
    set_training(model, False)
    sums = Sums()
    with torch.no_grad(), autocast():
        for batch in batches:
            sums.add(step.eval_batch(model, batch))
    set_training(model, True)
    return step.finalize(sums.means())


def train_epoch(step: Step, model: torch.nn.Module, ddp_model: torch.nn.Module, batches: Batches,
                update: Updater, autocast, epoch: int) -> dict[str, float]:
    batches.epoch = epoch
    step.start_epoch(model, epoch)
    sums = Sums()
    with autocast():
        for batch in batches:
            sums.add(step.train_batch(ddp_model, batch, update))
    return step.finalize(sums.means())


def autocast_for(precision: str, device: torch.device):
    """bf16 autocast on CPU and fp16 on GPU when precision is 'mixed'; a no-op context otherwise."""
    if precision != "mixed":
        return contextlib.nullcontext
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


class Updater:
    """`update(name, loss)`: one optimizer step with L1, scaling, clipping and the lr schedule; with a
    lottery ticket, its pruned weights are zeroed again after the step."""

    def __init__(self, step: Step, model: torch.nn.Module, cfg: TrainConfig, steps_per_epoch: int,
                 device: torch.device, ticket: Ticket | None = None) -> None:
        self.cfg, self.ticket = cfg.optim, ticket
        self.params = {name: [p for p in step.parameters(model, name) if p.requires_grad]
                       for name in step.optimizer_names(model)}
        self.optimizers = {n: build_optimizer(ps, cfg.optim) for n, ps in self.params.items()}
        self.schedulers = {n: build_scheduler(o, cfg.optim, steps_per_epoch, cfg.epochs)
                           for n, o in self.optimizers.items()}
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "mixed" and device.type == "cuda")
        self.guards = {n: DivergenceGuard(cfg.guard, device) for n in self.optimizers}

    def __call__(self, name: str, loss: torch.Tensor) -> None:
        opt, params, guard = self.optimizers[name], self.params[name], self.guards[name]
        opt.zero_grad(set_to_none=True)
        objective = loss + self.cfg.l1 * l1_penalty(params) if self.cfg.l1 else loss
        self.scaler.scale(objective).backward()
        norm = None
        if self.cfg.grad_clip is not None or guard.cfg.grad_norm is not None:
            self.scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip or math.inf)
        guard.observe(loss, norm)
        self.scaler.step(opt)
        self.scaler.update()
        self.schedulers[name].step()
        if self.ticket:
            self.ticket.apply()

    def diverged(self) -> str | None:
        """Why the run diverged (`DivergenceGuard`) on any worker this far, or None; the same on every rank."""
        tripped = torch.stack([g.tripped for g in self.guards.values()])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(tripped, op=dist.ReduceOp.MAX)
        reasons = [g.reason(n) for (n, g), t in zip(self.guards.items(), tripped.tolist(), strict=True) if t]
        return "; ".join(reasons) or None

    def lr(self) -> float:
        return next(iter(self.optimizers.values())).param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer_name": self.cfg.name,
                "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
                "steps": {n: s.last_epoch for n, s in self.schedulers.items()},
                "scaler": self.scaler.state_dict(),
                "guards": {n: g.state_dict() for n, g in self.guards.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore moments and step counts; hyperparameters come from the current config, so a resumed
        run honours a changed lr or weight decay. A changed optimizer starts with fresh moments."""
        if state["optimizer_name"] == self.cfg.name:
            for n, opt in self.optimizers.items():
                saved = state["optimizers"][n]
                groups = [{**g, **{k: v for k, v in cur.items() if k != "params"}}
                          for g, cur in zip(saved["param_groups"], opt.state_dict()["param_groups"], strict=True)]
                opt.load_state_dict({"state": saved["state"], "param_groups": groups})
        for n, sched in self.schedulers.items():
            sched.last_epoch = state["steps"][n]
            for group, base, factor in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas,
                                           strict=True):
                group["lr"] = base * factor(sched.last_epoch)
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        for n, guard_state in state.get("guards", {}).items():
            self.guards[n].load_state_dict(guard_state)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def training_state(model: torch.nn.Module, update: Updater, history: list[dict[str, float]]) -> dict[str, Any]:
    """What a checkpoint holds: weights, optimizer state, the epochs so far and a lottery ticket's masks."""
    return {"model": unwrap(model).state_dict(), "trainer": update.state_dict(), "history": history,
            "masks": update.ticket.masks if update.ticket else {}}


def load_state(path: str | Path) -> dict[str, Any]:
    """A raycraft checkpoint: only tensors and plain containers, so it loads with weights_only=True."""
    return torch.load(Path(path) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def _epoch_of(folder: str) -> int:
    name = folder.rstrip("/").rsplit("/", 1)[-1]
    return int(name.removeprefix("epoch_")) if name.startswith("epoch_") and name[6:].isdigit() else -1


def newest_checkpoint(reported, run_dir: str | None):
    """(checkpoint, skipped): the newest intact checkpoint among Ray Train's latest (`reported`) and every
    `epoch_*` folder in `run_dir` (Ray Train's, whether or not its record of them was written before a kill,
    and an --in-process run's own: a run may switch modes across --resume), and a line for each newer one
    that failed its manifest (`raycraft.checksums`), naming it and why."""
    import ray.train

    from raycraft.checksums import problem

    found = {reported.path: reported} if reported else {}
    if run_dir and Path(run_dir).is_dir():
        for folder in Path(run_dir).glob("epoch_*"):
            found.setdefault(str(folder), ray.train.Checkpoint(str(folder)))
    skipped = []
    for checkpoint in sorted(found.values(), key=lambda c: _epoch_of(c.path), reverse=True):
        with checkpoint.as_directory() as d:
            why = problem(d)
        if why is None:
            return checkpoint, skipped
        skipped.append(f"{Path(checkpoint.path).name} ({why})")
    return None, skipped


PARTIAL_PREFIX = "raycraft-ckpt-"


def remove_leftovers(run_dir: str | None) -> None:
    """Checkpoint folders that a killed process left half-written: this run's staging folders, and temporary
    folders (named with their writer's pid) of processes that are gone."""
    import shutil

    import psutil

    if run_dir and Path(run_dir).is_dir():
        for staging in Path(run_dir).glob(".epoch_*.partial"):
            shutil.rmtree(staging, ignore_errors=True)
    for folder in Path(tempfile.gettempdir()).glob(f"{PARTIAL_PREFIX}*-*"):
        pid = folder.name.removeprefix(PARTIAL_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def write_checkpoint(model: torch.nn.Module, update: Updater, history: list[dict[str, float]],
                     folder: Path) -> None:
    """The training state, then its manifest: a folder without a manifest is one whose write did not finish."""
    from raycraft.checksums import write_manifest

    torch.save(training_state(model, update, history), folder / CHECKPOINT_FILE)
    write_manifest(folder)


def save_in_process(folder: Path, run_dir: Path, epoch: int, keep: int) -> None:
    """Move an --in-process epoch's checkpoint `folder` to `run_dir/epoch_NNNN` (a rename, so a kill never
    leaves half a checkpoint there) and delete this mode's checkpoints beyond the newest `keep`."""
    import shutil

    run_dir.mkdir(parents=True, exist_ok=True)
    (folder / IN_PROCESS_MARK).touch()
    staging = run_dir / f".epoch_{epoch:04d}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.move(folder, staging)  # a rename on one file system, a copy and delete across two
    target = run_dir / f"epoch_{epoch:04d}"
    shutil.rmtree(target, ignore_errors=True)  # a resumed run that redoes an epoch
    staging.rename(target)
    ours = sorted((d for d in run_dir.glob("epoch_*") if (d / IN_PROCESS_MARK).exists()), key=lambda d: d.name)
    for old in ours[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def init_from_run(model: torch.nn.Module, uri: str, run_id: str) -> None:
    """Load run `run_id`'s final weights into `model`. Parameters only the new model has (adapters) keep
    their initialisation; a weight the new model lacks means a different architecture, and fails."""
    from raycraft.tracking import download_artifact

    with tempfile.TemporaryDirectory() as tmp:
        state = load_state(download_artifact(uri, run_id, f"checkpoint/{CHECKPOINT_FILE}", tmp).parent)
    result = model.load_state_dict(state["model"], strict=False)
    if result.unexpected_keys:
        raise ValueError(f"--init-from {run_id}: its weights {result.unexpected_keys[:5]} have no place in this "
                         "model; fine-tune a run of the same model and size.")


def quiet_ray_train_worker_logs() -> None:
    """Ray Train's per-report INFO line comes from a logger named by its file path, which escapes the
    run's `ray.train` log level (in local mode, from `train_fn_utils`); raise those loggers to WARNING so
    progress lines stay readable."""
    for name in list(logging.root.manager.loggerDict):
        if name.endswith(os.path.join("execution", "context.py")):
            logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray.train.v2._internal.execution.train_fn_utils").setLevel(logging.WARNING)  # local mode


def tune_allows(logger, epoch: int, world: int, device: torch.device) -> bool:
    """Rank 0 asks the sweep whether to go past `epoch` (see RunLogger.tune_allows); every rank follows it."""
    go = torch.tensor([float(logger.tune_allows(epoch)) if logger else 0.0], device=device)
    if world > 1:
        torch.distributed.broadcast(go, 0)
    return bool(go.item())


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    """Ray Train's entry point. `payload`: {'config': TrainConfig as a dict, 'run_id', 'tracking_uri',
    'started_at': when the user's command began, 'ray_init_s': seconds it spent starting Ray, 'paced_by_tune':
    a sweep trial, which waits for its scheduler's verdict after each epoch, 'start_from': a checkpoint to
    start from when Ray Train has none of this run's (a PBT exploit), 'run_dir': the run's local checkpoint
    folder, where an --in-process run saves its own checkpoints (None for remote storage)}."""
    import ray.train
    import ray.train.torch
    from ray.train import CheckpointUploadMode

    from raycraft.tracking import COMPLETED_TAG, DIVERGED_TAG, RunLogger

    quiet_ray_train_worker_logs()
    cfg = from_dict(TrainConfig, payload["config"])
    spec = model_spec(cfg.model)
    model_cfg = from_dict(spec.config_cls, cfg.model_args)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.cpus_per_worker)
    device = ray.train.torch.get_device()

    splits = load_dataset(cfg.dataset, cfg.data)
    step = step_for(spec.task)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, model_cfg, splits.info).to(device)
    train = Batches(splits.train, cfg.batch_size, rank, world, shuffle=True, seed=cfg.seed, device=device)
    val = Batches(splits.val, cfg.batch_size, rank, world, shuffle=False, device=device)
    test = Batches(splits.test, cfg.batch_size, rank, world, shuffle=False, device=device)
    update = Updater(step, model, cfg, len(train), device)
    autocast = autocast_for(cfg.precision, device)

    history: list[dict[str, float]] = []
    remove_leftovers(payload.get("run_dir"))
    checkpoint, skipped = newest_checkpoint(ray.train.get_checkpoint(), payload.get("run_dir"))
    if skipped and not checkpoint:
        raise RuntimeError(f"no intact checkpoint to restart from: {'; '.join(skipped)}")
    restored = checkpoint is not None
    if not checkpoint and payload.get("start_from"):  # a PBT trial taking over another trial's state
        checkpoint = ray.train.Checkpoint(payload["start_from"])
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = load_state(d)
        model.load_state_dict(state["model"])
        update.load_state_dict(state["trainer"])
        history = state["history"]
        update.ticket = Ticket(model, state["masks"]) if state.get("masks") else None
    elif cfg.init_from:
        init_from_run(model, payload["tracking_uri"], cfg.init_from)
    torch.manual_seed(cfg.seed + 1000 * rank + len(history))  # dropout differs per rank and epoch
    ddp_model = (step.distribute(model, lambda m: ray.train.torch.prepare_model(m, move_to_device=False))
                 if world > 1 else model)

    restored_history = list(history)
    logger = None
    # Importing MLflow takes seconds of CPU: rank 0 does it on a thread once set-up is done (started earlier,
    # it competes for the GIL with data loading and model building), waited for at its first log.
    logger_future = (concurrent.futures.ThreadPoolExecutor(1).submit(RunLogger, payload["tracking_uri"],
                                                                      payload["run_id"]) if rank == 0 else None)

    def logger_ready():
        """Rank 0's RunLogger, waited for at its first use so that training need not wait for MLflow's
        import; it first back-fills epochs a killed worker checkpointed but never logged."""
        nonlocal logger
        if logger is None and logger_future:
            logger = logger_future.result()
            logger.log_history(restored_history)
            if restored:
                logger.note_restore(len(restored_history))
            if skipped:
                logger.set_tag(SKIPPED_TAG, "; ".join(skipped))
        return logger

    training_starts_at = time.time()
    if not checkpoint and (cfg.prune.sparsity or cfg.prune.reinit):
        def train_round(ticket: Ticket, after_epoch) -> dict[str, float]:
            round_update = Updater(step, model, cfg, len(train), device, ticket)
            for epoch in range(cfg.epochs):
                train_epoch(step, model, ddp_model, train, round_update, autocast, epoch)
                after_epoch(epoch)
            return evaluate(step, ddp_model, val, autocast)

        def fresh_state() -> dict[str, torch.Tensor]:
            torch.manual_seed(cfg.seed + 1)
            return create_model(cfg.model, model_cfg, splits.info).to(device).state_dict()

        update.ticket, rounds = find_ticket(model, cfg.prune, train_round, fresh_state)
        if logger_ready():  # each IMP round's trained network, at the sparsity it trained with
            for r, (sparsity, val_metrics) in enumerate(rounds):
                logger.log_once({"imp_sparsity": sparsity, **prefixed(val_metrics, "imp_val_")}, step=r)
            logger.log_once({"sparsity": update.ticket.sparsity(), "imp_rounds": float(len(rounds))})

    for epoch in range(len(history), cfg.epochs):
        start = time.perf_counter()
        train_metrics = train_epoch(step, model, ddp_model, train, update, autocast, epoch)
        train_time = time.perf_counter() - start
        metrics = {"epoch": float(epoch), **prefixed(train_metrics, "train_"),
                   **prefixed(evaluate(step, ddp_model, val, autocast), "val_"),
                   "lr": update.lr(), "epoch_time": time.perf_counter() - start,
                   "samples_per_s": len(train.indices()) * world / train_time}
        logger_ready()
        bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
        diverged = update.diverged()
        if bad or diverged:  # every rank sees the same all-reduced values, so all stop here together
            if logger:
                logger.set_tag(DIVERGED_TAG, f"non-finite {', '.join(bad)} in epoch {epoch + 1}" if bad
                               else f"diverged in epoch {epoch + 1} ({diverged})")
            ray.train.report({"epoch": float(epoch)})
            return
        history.append(metrics)
        ckpt = None
        if rank == 0:  # the upload runs in the background and deletes this folder when done
            ckpt_dir = Path(tempfile.mkdtemp(prefix=f"{PARTIAL_PREFIX}{os.getpid()}-"))
            write_checkpoint(model, update, history, ckpt_dir)
            ckpt = ray.train.Checkpoint.from_directory(str(ckpt_dir))
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"epoch_{epoch:04d}",
                         checkpoint_upload_mode=CheckpointUploadMode.ASYNC)
        if ckpt and cfg.in_process:
            save_in_process(ckpt_dir, Path(payload["run_dir"]), epoch, cfg.keep_checkpoints)
        if logger:
            if epoch == 0:  # only a fresh run's start-up is the user's wait
                logger.log_once({"startup_s": training_starts_at - payload["started_at"],
                                 "ray_init_s": payload["ray_init_s"]})
            logger.log_epoch(metrics)
            with tempfile.TemporaryDirectory() as tmp:
                step.epoch_artifacts(unwrap(model), epoch, splits.info, Path(tmp))
                if any(Path(tmp).iterdir()):
                    logger.log_artifacts(tmp, f"epochs/epoch_{epoch:04d}")
        if payload.get("paced_by_tune") and epoch < cfg.epochs - 1 and not tune_allows(logger, epoch, world, device):
            return  # the sweep's scheduler stopped this trial

    final = {**history[-1], **prefixed(evaluate(step, ddp_model, test, autocast), "test_")}
    if logger_ready():
        logger.log_once({k: v for k, v in final.items() if k.startswith("test_")})
        with tempfile.TemporaryDirectory() as tmp:
            from raycraft.plots import curves_png

            curves_png(history, Path(tmp) / "curves.png")
            full_test = Batches(splits.test, cfg.batch_size, shuffle=False, device=device)
            with autocast():
                end_metrics = step.artifacts(unwrap(model).eval(), full_test, splits.info, Path(tmp))
            if end_metrics:
                logger.log_once(end_metrics)
            logger.log_artifacts(tmp, "plots")
        with tempfile.TemporaryDirectory() as tmp:
            write_checkpoint(model, update, history, Path(tmp))
            logger.log_artifacts(tmp, "checkpoint")
        example = step.example_input(next(iter(full_test)))
        if example is not None:
            logger.log_model(unwrap(model), example)
        logger.set_tag(COMPLETED_TAG, "true")
    ray.train.report({**final, "done": 1.0})
