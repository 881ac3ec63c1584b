"""Ray Data sources: the datasets that workers stream instead of loading whole (`data.ingest=ray_data`).

A `Source` is what the driver learns before Ray starts (the files of each split, its row count, the shapes a
model adapts to) and, once Ray runs, a lazy `ray.data.Dataset` per split whose rows are {"x", "y"}. Reading
and decoding run as Ray Data tasks on any node with free CPUs, CPU-only nodes included; trainers only iterate
their shard. Memory stays bounded by Ray Data's streaming executor (blocks in flight, spilled when the object
store is full), not by the dataset's size.

Order, which resuming mid-epoch relies on: each split's file order is fixed (image_folder: shuffled once by
`split_seed`, as the in-memory reader splits it), Ray Train reads with `preserve_order`, so the shard each worker
gets is the same every epoch, and each worker shuffles its shard through a buffer of `data.shuffle_buffer` rows
seeded by seed + epoch (`raycraft.train.ingest`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import ray.data
import torch
from ray.data.extensions import ArrowTensorArray

from raycraft import storage
from raycraft.data.base import SPLITS, DataConfig, DataSplits, split_order
from raycraft.data.tables import table_info, table_split, to_numpy
from raycraft.data.text import read_tokens, shard_meta, shards_info, token_split
from raycraft.data.vision import check_headers, image_files, rgb_scale
from raycraft.errors import UserError

ROWS_PER_BLOCK = 1024  # an in-memory dataset's rows per Ray Data block


@dataclass
class Source:
    """A dataset as Ray Data streams it: `info` for the model, `rows` per split, and `read(split)`, called once
    Ray runs, for the split's lazy dataset of {"x", "y"} rows."""

    info: dict[str, Any]
    rows: dict[str, int]
    read: Callable[[str], ray.data.Dataset] = field(repr=False)

    def keep_train_fraction(self, fraction: float) -> None:
        """Train on the first `fraction` of the training split's rows (at least one), as `DataSplits` does."""
        if fraction < 1.0:
            read, kept = self.read, max(1, int(round(fraction * self.rows["train"])))
            self.read = lambda split: read(split).limit(kept) if split == "train" else read(split)
            self.rows = {**self.rows, "train": kept}

    def datasets(self) -> dict[str, ray.data.Dataset]:
        """Each split's dataset, and the test split again as `test_full` (`raycraft.train.ingest.ShardConfig`).
        Ray Data's own progress bars and per-execution lines are off: every epoch of every split would print
        them between raycraft's progress lines (its logs under the Ray session folder keep them)."""
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = ctx.enable_operator_progress_bars = ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        return {**{split: self.read(split) for split in SPLITS}, "test_full": self.read("test")}


def image_folder(cfg: DataConfig) -> Source:
    """Images decoded and resized by `ray.data.read_images`, labelled by their class folder."""
    if cfg.label_noise:
        raise UserError(f"data.label_noise: {cfg.label_noise} needs the in-memory reader; set data.ingest=memory.")
    files, _, classes = image_files(cfg)  # a streamed image's label is its folder's
    check_headers(files)
    train, val, test, _ = split_order(len(files), cfg)
    parts = {"train": train, "val": val, "test": test}
    size = cfg.image_size

    def read(split: str) -> ray.data.Dataset:
        paths = [files[i] for i in parts[split].tolist()]
        fs, _ = storage.filesystem(paths[0])
        ds = ray.data.read_images([storage.filesystem(p)[1] for p in paths], filesystem=fs, size=(size, size),
                                  mode="RGB", include_paths=True)
        return ds.map_batches(_ImageRows(classes), batch_format="numpy")

    return Source({"input_shape": (3, size, size), "num_classes": len(classes), "class_names": classes,
                   "input_scale": rgb_scale(size)}, {s: len(p) for s, p in parts.items()}, read)


class _ImageRows:
    """(N, H, W, 3) uint8 images to {"x": (N, 3, H, W) floats in [0, 1], "y": class of the parent folder}."""

    def __init__(self, classes: list[str]) -> None:
        self.label = {c: i for i, c in enumerate(classes)}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = batch["image"].transpose(0, 3, 1, 2).astype(np.float32) / 255.0
        y = np.array([self.label[p.rstrip("/").split("/")[-2]] for p in batch["path"]], dtype=np.int64)
        return {"x": x, "y": y}


def table(cfg: DataConfig) -> Source:
    """Parquet or CSV files read by Ray Data, the features stacked into x."""
    tables = {s: table_split(cfg, s) for s in SPLITS}

    def read(split: str) -> ray.data.Dataset:
        t = tables[split]
        fs, _ = storage.filesystem(t.files[0])
        reader = ray.data.read_parquet if t.format == "parquet" else ray.data.read_csv
        ds = reader([storage.filesystem(f)[1] for f in t.files], filesystem=fs)
        return ds.map_batches(to_numpy, fn_kwargs={"features": t.features, "label": t.label}, batch_format="numpy")

    return Source(table_info(tables), {s: t.rows for s, t in tables.items()}, read)


def token_shards(cfg: DataConfig) -> Source:
    """Each shard file read whole by one task and cut into its non-overlapping windows of seq_len tokens."""
    meta = shard_meta(cfg)
    shards = {s: token_split(cfg, meta, s) for s in SPLITS}
    seq_len = cfg.seq_len

    def windows(row: dict[str, Any]) -> list[dict[str, np.ndarray]]:
        tokens = read_tokens(row["path"], np.dtype(meta["dtype"]))
        n = (len(tokens) - 1) // seq_len
        return [{"x": tokens[i * seq_len:(i + 1) * seq_len], "y": tokens[i * seq_len + 1:(i + 1) * seq_len + 1]}
                for i in range(n)]

    def read(split: str) -> ray.data.Dataset:
        return ray.data.from_items([{"path": f} for f in shards[split].files]).flat_map(windows)

    return Source(shards_info(meta, cfg), {s: sum(sh.windows()) for s, sh in shards.items()}, read)


def from_memory(splits: DataSplits) -> Source:
    """An in-memory dataset (a shipped one) put into Ray's object store in blocks of ROWS_PER_BLOCK rows, for
    `data.ingest=ray_data`: every example as (x, y)."""
    tensors = {}
    for split in SPLITS:
        data = getattr(splits, split)
        batch = data[torch.arange(len(data))]
        if not (isinstance(batch, tuple) and len(batch) == 2):
            raise UserError("data.ingest: ray_data streams (x, y) examples; this dataset's are not. Use "
                            "data.ingest=memory.")
        tensors[split] = tuple(t.numpy() for t in batch)

    def read(split: str) -> ray.data.Dataset:
        x, y = tensors[split]
        return ray.data.from_arrow([pa.table({"x": ArrowTensorArray.from_numpy(x[i:i + ROWS_PER_BLOCK]),
                                              "y": y[i:i + ROWS_PER_BLOCK]})
                                    for i in range(0, len(x), ROWS_PER_BLOCK)])

    return Source(splits.info, {s: len(t[0]) for s, t in tensors.items()}, read)


SOURCES = {"image_folder": image_folder, "table": table, "token_shards": token_shards}
