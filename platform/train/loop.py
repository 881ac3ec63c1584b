"""The training loop's parts that need no Ray: sharded batches, metric sums, an epoch of training or of
evaluation, the optimizer step (`Updater`), and a checkpoint's files.

`raycraft.train.worker` runs them on Ray Train, one epoch after another; `raycraft eval` evaluates with them
without Ray. A checkpoint is one folder: `state.pt` (weights, optimizer state, the epochs so far, a lottery
ticket's masks), then its manifest (`raycraft.checksums`), written last so that a folder without one is a
write that did not finish.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from raycraft.checksums import write_manifest
from raycraft.train.config import TrainConfig
from raycraft.train.guard import DivergenceGuard
from raycraft.train.optim import build_optimizer, build_scheduler, l1_penalty
from raycraft.train.pruning import Ticket
from raycraft.train.step import Step

CHECKPOINT_FILE = "state.pt"
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
        self.skip = 0
        """Batches of this epoch already trained on (a resumed epoch's first ones), left out."""

    def indices(self) -> torch.Tensor:
        n = len(self.data)
        if not self.shuffle:
            return torch.arange(n)[self.rank::self.world]
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        pad = (-n) % self.world
        order = torch.cat([order, order[:pad]])
        return order[self.rank::self.world]

    def examples(self) -> int:
        return len(self.indices())

    def __len__(self) -> int:
        return math.ceil(len(self.indices()) / self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        idx = self.indices()
        for start in range(self.skip * self.batch_size, len(idx), self.batch_size):
            batch = self.data[idx[start:start + self.batch_size]]
            yield tuple(t.to(self.device, non_blocking=True) for t in batch)


class Sums:
    """Running per-example sums of a step's metrics, reduced over workers into means."""

    def __init__(self, totals: dict[str, torch.Tensor] | None = None) -> None:
        self.totals: dict[str, torch.Tensor] = dict(totals or {})

    def add(self, sums: dict[str, torch.Tensor]) -> None:
        for k, v in sums.items():
            v = v.detach().double()
            self.totals[k] = self.totals[k] + v if k in self.totals else v

    def reduced(self, everywhere: bool = True) -> dict[str, float]:
        """The totals summed over all workers (a collective), or this worker's alone."""
        keys = sorted(self.totals)
        vec = torch.stack([self.totals[k].cpu() for k in keys]) if keys else torch.zeros(0)
        if everywhere and dist.is_available() and dist.is_initialized():
            dist.all_reduce(vec)
        return dict(zip(keys, vec.tolist(), strict=True))

    def means(self, everywhere: bool = True) -> dict[str, float]:
        """Sum over all workers (or on this one), then divide by the example count 'n'."""
        totals = self.reduced(everywhere)
        if not totals:
            return {}
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


AfterBatch = Callable[[int, dict[str, torch.Tensor], Sums], None]
"""Called after each training batch with (batches done this epoch, the batch's sums, the epoch's sums)."""


def train_epoch(step: Step, model: torch.nn.Module, ddp_model: torch.nn.Module, batches: Batches,
                update: Updater, autocast, epoch: int, after_batch: AfterBatch | None = None,
                sums: Sums | None = None) -> dict[str, float]:
    """One epoch, or what is left of it after `batches.skip` batches whose sums `sums` holds."""
    batches.epoch = epoch
    step.start_epoch(model, epoch)
    sums = sums or Sums()
    with autocast():
        for i, batch in enumerate(batches, start=batches.skip + 1):
            batch_sums = step.train_batch(ddp_model, batch, update)
            sums.add(batch_sums)
            if after_batch:
                after_batch(i, batch_sums, sums)
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
        # autocast keeps its low-precision copies of the weights until its context exits, and the loop's
        # context spans the epoch: without this, every later forward would use the weights of the first
        torch.clear_autocast_cache()
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


def training_state(model: torch.nn.Module, update: Updater, history: list[dict[str, float]],
                   progress: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a checkpoint holds: weights, optimizer state, the epochs so far, a lottery ticket's masks, and
    `progress`: the logged steps ("steps") and, mid-epoch, where in the epoch it was taken ("position")."""
    return {"model": unwrap(model).state_dict(), "trainer": update.state_dict(), "history": history,
            "masks": update.ticket.masks if update.ticket else {}, **(progress or {})}


def load_state(path: str | Path) -> dict[str, Any]:
    """A raycraft checkpoint: only tensors and plain containers, so it loads with weights_only=True."""
    return torch.load(Path(path) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


PARTIAL_PREFIX = "raycraft-ckpt-"


def remove_leftovers(run_dir: str | None) -> None:
    """Checkpoint folders that a killed process left half-written: this run's staging folders, and temporary
    folders (named with their writer's pid) of processes that are gone."""
    if run_dir and Path(run_dir).is_dir():
        for staging in Path(run_dir).glob(".epoch_*.partial"):  # `save_in_process`'s
            shutil.rmtree(staging, ignore_errors=True)
    for folder in Path(tempfile.gettempdir()).glob(f"{PARTIAL_PREFIX}*-*"):
        pid = folder.name.removeprefix(PARTIAL_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def write_checkpoint(model: torch.nn.Module, update: Updater, history: list[dict[str, float]],
                     folder: Path, progress: dict[str, Any] | None = None) -> None:
    """The training state, then its manifest: a folder without a manifest is one whose write did not finish."""
    torch.save(training_state(model, update, history, progress), folder / CHECKPOINT_FILE)
    write_manifest(folder)


def checkpoint_name(epoch: int, batch: int | None = None) -> str:
    """`epoch_NNNN`: after epoch NNNN (0-based); `epoch_NNNN_batch_BBBBBB`: BBBBBB batches into it."""
    return f"epoch_{epoch:04d}" if batch is None else f"epoch_{epoch:04d}_batch_{batch:06d}"


def progress_of(name: str) -> tuple[int, int]:
    """How far a checkpoint named by `checkpoint_name` got, as (epochs done, batches into the next): the key
    that orders checkpoints newest last. (-1, 0) for any other name."""
    parts = name.rstrip("/").rsplit("/", 1)[-1].split("_")
    if parts[0] != "epoch" or not all(p.isdigit() for p in parts[1::2]):
        return -1, 0
    if len(parts) == 2:
        return int(parts[1]) + 1, 0
    return (int(parts[1]), int(parts[3])) if len(parts) == 4 and parts[2] == "batch" else (-1, 0)


def save_in_process(folder: Path, run_dir: Path, name: str, keep: int) -> None:
    """Move an --in-process run's checkpoint `folder` to `run_dir/name` (a rename, so a kill never leaves half
    a checkpoint there) and delete this mode's checkpoints beyond the newest `keep`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (folder / IN_PROCESS_MARK).touch()
    staging = run_dir / f".{name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.move(folder, staging)  # a rename on one file system, a copy and delete across two
    target = run_dir / name
    shutil.rmtree(target, ignore_errors=True)  # a resumed run that redoes an epoch
    staging.rename(target)
    ours = sorted((d for d in run_dir.glob("epoch_*") if (d / IN_PROCESS_MARK).exists()),
                  key=lambda d: progress_of(d.name))
    for old in ours[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
