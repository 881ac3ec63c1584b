"""What every dataset returns: fixed train/val/test splits and the shapes a model adapts to."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from raycraft.errors import UserError, check_count
from raycraft.registry import field_doc

SPLITS = ("train", "val", "test")


@dataclass
class DataConfig:
    """Where data comes from and how it is split. The split is fixed by `split_seed`, not the run's seed,
    so `raycraft eval` on any run sees the same test set."""

    data_dir: str | None = field_doc(None, "Folder of your own files, for datasets that read them.")
    val_fraction: float = field_doc(0.15, "Share of the non-test data held out for validation.")
    test_fraction: float = field_doc(0.15, "Share held out for the test set (datasets without a fixed test set).")
    split_seed: int = field_doc(0, "Seed of the train/val/test permutation.")
    image_size: int = field_doc(32, "Side length images are resized to (image_folder only).")
    seq_len: int = field_doc(128, "Tokens per window of a text dataset: the context of a Transformer, the "
                                  "truncated-BPTT length of an RNN.")
    tokenizer: Literal["char", "bpe"] = field_doc("char", "Text datasets: one token per character, or BPE.")
    vocab_size: int = field_doc(4096, "Text datasets with tokenizer=bpe: the BPE vocabulary size.")
    train_windows: int = field_doc(0, "Text datasets: training windows per epoch, at random offsets fixed by "
                                      "split_seed (0: every non-overlapping window).")
    label_noise: float = field_doc(0.0, "Share of training labels replaced by uniformly random classes "
                                        "(val and test stay clean); the double-descent experiment uses it.")
    train_fraction: float = field_doc(1.0, "Share of the training split used (its first part); scaling-law "
                                           "runs vary the data size D with it.")
    ingest: Literal["auto", "memory", "ray_data"] = field_doc(
        "auto", "How workers get their batches. ray_data: Ray Data streams each worker its shard, decoded by Ray "
                "tasks anywhere in the cluster, so the data may be larger than memory and live in s3://; memory: "
                "every worker loads the whole dataset. auto: ray_data for datasets read from files (image_folder, "
                "table, token_shards), memory for the small shipped ones and --in-process runs "
                "(docs/data.md gives the figures).")
    shuffle_buffer: int = field_doc(
        4096, "ray_data: rows in each worker's shuffle buffer, reseeded every epoch (seed + epoch); the file order "
              "is shuffled once, by split_seed. 0: no shuffling within the file order.")
    label_column: str = field_doc("label", "table: the column of class indices; every other column is a feature.")

    def __post_init__(self) -> None:
        for name in ("val_fraction", "test_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v < 0.5:
                raise UserError(f"data.{name}: {v} is out of range; use a fraction in [0, 0.5).")
        check_count("data.seq_len", self.seq_len)
        if self.train_windows < 0:
            raise UserError(f"data.train_windows: {self.train_windows} must be >= 0.")
        if not 0.0 < self.train_fraction <= 1.0:
            raise UserError(f"data.train_fraction: {self.train_fraction} is out of range; use (0, 1].")
        if self.shuffle_buffer < 0:
            raise UserError(f"data.shuffle_buffer: {self.shuffle_buffer} must be >= 0 rows.")
        if not 0.0 <= self.label_noise <= 1.0:
            raise UserError(f"data.label_noise: {self.label_noise} is out of range; use a fraction in [0, 1].")


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    test: Dataset
    info: dict[str, Any] = field(default_factory=dict)
    """Shapes for the model: 'input_shape' (C, H, W) for images, 'num_classes', 'class_names'."""

    def keep_train_fraction(self, fraction: float) -> None:
        """Train on the first `fraction` of the training split (at least one example): the data size D of a
        scaling-law run. A Subset keeps batch indexing `ds[tensor]`."""
        if fraction < 1.0:
            self.train = Subset(self.train, torch.arange(max(1, int(round(fraction * len(self.train))))))


def split_order(n: int, cfg: DataConfig, fixed_test: bool = False) -> tuple[torch.Tensor, ...]:
    """(train, val, test) example indices of a seeded permutation of `n` examples, and the generator for label
    noise; with a fixed test set only val is carved out (test is empty). Streaming and in-memory readers of one
    dataset split it alike, so `raycraft eval` sees the test set a run held out."""
    g = torch.Generator().manual_seed(cfg.split_seed)
    perm = torch.randperm(n, generator=g)
    n_test = 0 if fixed_test else int(round(n * cfg.test_fraction))
    n_val = int(round((n - n_test) * cfg.val_fraction))
    if n - n_test - n_val <= 0:
        raise UserError(f"data: {n} examples leave nothing to train on with val_fraction={cfg.val_fraction} "
                        f"and test_fraction={cfg.test_fraction}.")
    held_out = {"val": (n_val, cfg.val_fraction), "test": (n_test, 0.0 if fixed_test else cfg.test_fraction)}
    for part, (k, fraction) in held_out.items():
        if fraction and not k:
            raise UserError(f"data: {n} examples leave the {part} split empty at {part}_fraction={fraction}; "
                            f"add examples or raise data.{part}_fraction.")
    return perm[n_test + n_val:], perm[n_test:n_test + n_val], perm[:n_test], g


def split_tensors(x: torch.Tensor, y: torch.Tensor, cfg: DataConfig,
                  test: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[TensorDataset, ...]:
    """Seeded permutation into train/val/test; when a fixed test set is given only val is carved out."""
    train, val, held_test, g = split_order(len(x), cfg, test is not None)
    test_ds = TensorDataset(*test) if test is not None else TensorDataset(x[held_test], y[held_test])
    return (TensorDataset(x[train], noisy_labels(y[train], cfg.label_noise, g)),
            TensorDataset(x[val], y[val]), test_ds)


def noisy_labels(y: torch.Tensor, fraction: float, g: torch.Generator) -> torch.Tensor:
    """A copy of `y` whose first round(fraction * n) entries of a seeded permutation get random classes
    (a random class may equal the true one, as in Nakkiran et al.'s label noise)."""
    if fraction == 0:
        return y
    k = int(y.max()) + 1
    pick = torch.randperm(len(y), generator=g)[:int(round(fraction * len(y)))]
    out = y.clone()
    out[pick] = torch.randint(0, k, (len(pick),), generator=g)
    return out


def cache_dir() -> Path:
    """Where raycraft keeps what it derives once and reuses (BPE merges, FID classifiers): `$RAYCRAFT_CACHE`,
    default `~/.cache/raycraft`."""
    return Path(os.environ.get("RAYCRAFT_CACHE", Path.home() / ".cache" / "raycraft"))
