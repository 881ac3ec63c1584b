"""The trainer's configuration: one typed dataclass per concern, built by `config.build` from the model's
recipe, YAML, flags and `--set`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from raycraft import tracking
from raycraft.config import JobConfig, build, load_yaml, read_yaml
from raycraft.data.base import DataConfig
from raycraft.errors import UserError, check_count
from raycraft.registry import field_doc
from raycraft.train.guard import GuardConfig

MAX_EPOCHS = 100_000  # recipes train for at most hundreds of epochs; more is a typo that would run for years


@dataclass
class OptimConfig:
    """Optimizer, learning-rate schedule and regularisation."""

    name: Literal["sgd", "adam", "adamw", "rmsprop"] = field_doc(
        "adamw", "sgd (with momentum), adam, adamw or rmsprop (WGAN's weight-clipped critic).")
    lr: float = field_doc(1e-3, "Peak learning rate, reached at the end of warm-up.")
    momentum: float = field_doc(0.9, "SGD momentum (sgd only).")
    betas: tuple[float, float] = field_doc((0.9, 0.999), "Adam's (beta1, beta2).")
    weight_decay: float = field_doc(0.0, "L2 penalty (decoupled for adamw).")
    l1: float = field_doc(0.0, "L1 penalty lambda: adds lambda * sum|theta| over trained weights to the loss.")
    schedule: Literal["constant", "cosine"] = field_doc(
        "cosine", "After warm-up: keep lr, or decay it along a half cosine to min_lr_ratio * lr.")
    warmup_epochs: float = field_doc(0.0, "Linear warm-up from 0 to lr over this many epochs (fractions allowed).")
    min_lr_ratio: float = field_doc(0.0, "Final lr of the cosine schedule as a fraction of lr.")
    grad_clip: float | None = field_doc(None, "Clip the global gradient norm to this value (None: no clipping).")

    def __post_init__(self) -> None:
        for name in ("lr", "weight_decay", "l1", "warmup_epochs", "min_lr_ratio"):
            if getattr(self, name) < 0:
                raise UserError(f"optim.{name}: {getattr(self, name)} must be >= 0.")
        if self.lr == 0:
            raise UserError("optim.lr: 0 would never update the weights; use a positive learning rate.")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise UserError(f"optim.grad_clip: {self.grad_clip} must be > 0 (or null for no clipping).")


@dataclass
class PruneConfig:
    """Lottery-ticket search (Frankle & Carbin 2019): iterative magnitude pruning with rewinding."""

    sparsity: float = field_doc(
        0.0, "Fraction of the prunable weights (linear and conv weights; not biases or norms) that are zero "
             "in the final training. 0: a dense run.")
    rate: float = field_doc(
        0.2, "Fraction of the surviving weights each pruning round removes (the paper's 20%); rounds go on "
             "until `sparsity` is reached, the last one pruning exactly to it.")
    rewind_epoch: int = field_doc(
        0, "After each round the surviving weights go back to their values after this many epochs of the "
           "first (dense) training: 0 is the original ticket (the initialisation), 1 or 2 is rewinding "
           "(Frankle et al. 2019), which finds tickets in deeper nets.")
    reinit: bool = field_doc(
        False, "The control: train the ticket's mask from a fresh random initialisation instead of the "
               "rewound weights. A winning ticket is one that beats this.")

    def __post_init__(self) -> None:
        if not 0 <= self.sparsity < 1:
            raise UserError(f"prune.sparsity: {self.sparsity} must be in [0, 1).")
        if not 0 < self.rate < 1:
            raise UserError(f"prune.rate: {self.rate} must be in (0, 1).")
        if self.rewind_epoch < 0:
            raise UserError(f"prune.rewind_epoch: {self.rewind_epoch} must be >= 0.")


@dataclass
class TrainConfig(JobConfig):
    """A training job: which model on which data, for how long, on what resources, tracked where. Under the
    user's keys lies the model's recipe (`ModelSpec.recipe`); `model_config` is the model's typed config."""

    model: str = field_doc("lenet5", "Registered model name (`raycraft models`).")
    dataset: str = field_doc("digits", "Registered dataset name (`raycraft datasets`).")
    model_args: dict[str, Any] = field_doc(
        doc="The model's own config (`raycraft models --details NAME`); `--set dropout=0.2` is short for "
            "`--set model_args.dropout=0.2`.", factory=dict)
    epochs: int = field_doc(10, "Passes over the training split.")
    batch_size: int = field_doc(64, "Examples per step on each worker (global batch = workers x this).")
    workers: int = field_doc(1, "Ray Train workers (data-parallel replicas).")
    in_process: bool = field_doc(
        False, "Run the training function in this process (Ray Train's local mode, `ScalingConfig(num_workers="
               "0)`): no Ray cluster and no worker processes, so training starts in seconds; one worker, and no "
               "restart of a failed worker (`--resume` continues from the last epoch's checkpoint, which is "
               "still saved under storage_path).")
    cpus_per_worker: int = field_doc(1, "CPUs reserved per worker; also its torch thread count.")
    gpu: bool = field_doc(False, "One GPU per worker (NCCL); otherwise CPU workers with gloo.")
    precision: Literal["fp32", "mixed"] = field_doc(
        "fp32", "mixed: bf16 autocast on CPU, fp16 autocast with a GradScaler on GPU.")
    seed: int = field_doc(0, "Seed of weights, shuffling and dropout.")
    optim: OptimConfig = field_doc(doc="Optimizer and schedule.", factory=OptimConfig)
    data: DataConfig = field_doc(doc="Data location and splits.", factory=DataConfig)
    prune: PruneConfig = field_doc(doc="Lottery-ticket pruning before the final training (off by default).",
                                   factory=PruneConfig)
    guard: GuardConfig = field_doc(doc="Divergence guard: when an exploding loss or gradient stops the run.",
                                   factory=GuardConfig)
    experiment: str = field_doc("raycraft", "MLflow experiment name.")
    max_failures: int = field_doc(2, "Times a failed worker group is restarted from the last checkpoint.")
    keep_checkpoints: int = field_doc(2, "Newest checkpoints kept in storage (the latest is also in MLflow).")
    log_every_steps: int = field_doc(
        0, "Log the training metrics of every this many steps (global, counted over epochs) to MLflow as "
           "step_train_* at step = that step, and print them as a line when output is not a terminal. "
           "0: once per epoch only.")
    checkpoint_every_steps: int = field_doc(
        0, "Also checkpoint every this many steps within an epoch; a restart resumes at that step, skipping "
           "the batches it already trained on. 0: at the end of each epoch only.")
    checkpoint_every_minutes: float = field_doc(
        0.0, "Also checkpoint mid-epoch when this many minutes have passed since the last checkpoint. 0: off.")
    storage_path: str = field_doc("ray_results", "Folder (or URI: s3://BUCKET/PREFIX) for Ray Train checkpoints.")
    artifact_root: str | None = field_doc(
        None, "Where a new MLflow experiment keeps its runs' artifacts (config.yaml, checkpoint, model, plots): a "
              "folder or URI, e.g. s3://BUCKET/PREFIX (needs the s3 extra). None: beside a SQLite store, or the "
              "tracking server's default. An experiment that exists keeps its own (docs/storage.md).")
    init_from: str | None = field_doc(None, "MLflow run id whose final weights start this run (fine-tuning, "
                                            "e.g. with LoRA); weights the new model adds keep their init.")
    system_metrics: bool = field_doc(
        True, "Log the machine's CPU, memory, disk, network and (with nvidia-ml-py) GPU use to the run as "
              "MLflow system metrics (`system/*`), sampled by the process that holds the run every 10 s "
              "(MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL). A sweep's trials log none.")

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "workers", "cpus_per_worker", "keep_checkpoints"):
            if getattr(self, name) < 1:
                hint = " (--in-process trains in this process, without Ray workers)" if name == "workers" else ""
                raise UserError(f"--{name.replace('_', '-')}: {getattr(self, name)} must be at least 1{hint}.")
        check_count("--epochs", self.epochs, MAX_EPOCHS)
        if self.in_process and self.workers > 1:
            raise UserError(f"--in-process: trains one worker, in this process; it cannot run --workers "
                            f"{self.workers}. Drop --in-process for {self.workers} data-parallel Ray Train workers.")
        if self.in_process and "://" in self.storage_path:
            raise UserError(f"storage_path: {self.storage_path!r} is remote; an --in-process run saves its "
                            "checkpoints itself, to a local folder.")
        for name in ("log_every_steps", "checkpoint_every_steps", "checkpoint_every_minutes"):
            if getattr(self, name) < 0:
                raise UserError(f"{name}: {getattr(self, name)} must be >= 0 (0 turns it off).")
        if self.max_failures < 0:
            raise UserError(f"max_failures: {self.max_failures} must be >= 0.")
        if self.prune.sparsity and self.prune.rewind_epoch >= self.epochs:
            raise UserError(f"prune.rewind_epoch: {self.prune.rewind_epoch} must be below epochs ({self.epochs}): "
                            "it names an epoch of the dense training to rewind to.")


def build_config(base: dict[str, Any] | None = None, overrides: list[str] = ()) -> tuple[TrainConfig, Any]:
    """(TrainConfig, model config) from one mapping of keys (YAML, flags) and `--set` strings: `config.build`."""
    return build(TrainConfig, [base], overrides)


def config_layers(uri: str, config: Path | None, resume: str | None, flags: dict[str, Any]) -> list[dict[str, Any]]:
    """A command's layers of config keys for `config.build`, lowest first: the resumed run's config.yaml, the
    --config file, then the flags given (`train`, `rl`)."""
    file = load_yaml(config) if config else {}
    resumed = {}
    if resume:
        tracking.get_run(uri, resume)
        resumed = read_yaml(tracking.download_text(uri, resume, "config.yaml"), f"run {resume}'s config.yaml")
    return [resumed, file, {k: v for k, v in flags.items() if v is not None}]
