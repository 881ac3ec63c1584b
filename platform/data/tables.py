"""`table`: your own tabular data, Parquet or CSV, from a folder or an s3:// prefix.

`--data-dir` holds one entry per split, `train`, `val` and `test`: a file (`train.parquet`, `train.csv`) or a
folder of them. `data.label_column` holds class indices 0..K-1; every other column is a numeric feature,
so an example is x in R^F (an MLP's input) and its class y.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import torch
from torch.utils.data import TensorDataset

from raycraft import storage
from raycraft.data.base import SPLITS, DataConfig, DataSplits
from raycraft.errors import UserError
from raycraft.registry import register_dataset

FORMATS = {".parquet": "parquet", ".csv": "csv"}


@dataclass
class Table:
    """One split's files, their format and columns, and its row count, as the driver reads them before Ray."""

    files: list[str]
    format: str
    features: list[str]
    label: str
    rows: int

    def dataset(self) -> pads.Dataset:
        fs, _ = storage.filesystem(self.files[0])
        return pads.dataset([storage.filesystem(f)[1] for f in self.files], format=self.format, filesystem=fs)


def _split_files(root: str, split: str) -> list[str]:
    """`root/<split>.<format>`, or the files of the folder `root/<split>/`."""
    def first_part(path: str) -> str:
        rel = path[len(root.rstrip("/")) + 1:]
        return rel.split("/")[0] if "/" in rel else rel.split(".")[0]

    return [f for f in storage.list_files(root, set(FORMATS)) if first_part(f) == split]


def table_split(cfg: DataConfig, split: str) -> Table:
    """The split's files under --data-dir, checked: one format, the label column present, numeric features."""
    root = cfg.data_dir or ""
    files = _split_files(root, split)
    if not files:
        raise UserError(f"--data-dir: {root} has no {split} split: give {split}.parquet, {split}.csv or a "
                        f"folder {split}/ of them (splits: {', '.join(SPLITS)}).")
    formats = {FORMATS["." + f.rsplit(".", 1)[-1].lower()] for f in files}
    if len(formats) > 1:
        raise UserError(f"--data-dir: the {split} split mixes {' and '.join(sorted(formats))} files; use one format.")
    table = Table(files, formats.pop(), [], cfg.label_column, 0)
    try:
        ds = table.dataset()
        schema, table.rows = ds.schema, ds.count_rows()
    except (OSError, pa.ArrowInvalid) as exc:
        raise UserError(f"--data-dir: the {split} split ({files[0]}, ...) is unreadable ({exc}).") from None
    if cfg.label_column not in schema.names:
        raise UserError(f"data.label_column: {cfg.label_column!r} is not a column of {files[0]}; its columns: "
                        f"{', '.join(schema.names)}.")
    table.features = [f.name for f in schema if f.name != cfg.label_column]
    bad = [f.name for f in schema if f.name in table.features and not pa.types.is_floating(f.type)
           and not pa.types.is_integer(f.type)]
    if bad or not table.features:
        raise UserError(f"--data-dir: {files[0]}: features must be numeric columns; "
                        f"{', '.join(bad) if bad else 'there are none besides ' + cfg.label_column}.")
    return table


def num_classes(train: Table) -> int:
    """K from the training split's labels, which must be class indices 0..K-1 (at least two classes)."""
    low, high = None, None
    for batch in train.dataset().to_batches(columns=[train.label]):
        bounds = pc.min_max(batch.column(0))
        lo, hi = bounds["min"].as_py(), bounds["max"].as_py()
        low = lo if low is None else min(low, lo)
        high = hi if high is None else max(high, hi)
    if low is None or low < 0:
        raise UserError(f"data.label_column: {train.label!r} must hold class indices >= 0; found {low}.")
    return int(high) + 1


def to_numpy(batch: dict[str, np.ndarray], features: list[str], label: str) -> dict[str, np.ndarray]:
    """Columns to one example matrix: {"x": (N, F) float32, "y": (N,) int64}."""
    return {"x": np.stack([np.asarray(batch[c], dtype=np.float32) for c in features], axis=1),
            "y": np.asarray(batch[label], dtype=np.int64)}


def table_info(tables: dict[str, Table]) -> dict:
    k = num_classes(tables["train"])
    return {"input_shape": (len(tables["train"].features),), "num_classes": k,
            "class_names": [str(i) for i in range(k)],
            "input_scale": f"the feature columns as the table holds them, unscaled, in this order: "
                           f"{', '.join(tables['train'].features)}"}


@register_dataset("table", task="classification", needs_data_dir=True, streams=True)
def table(cfg: DataConfig) -> DataSplits:
    """Your Parquet or CSV table (train/val/test files or folders, a folder or s3:// prefix): class from
    data.label_column, numeric features from every other column."""
    tables = {s: table_split(cfg, s) for s in SPLITS}
    parts = []
    for t in tables.values():
        read = t.dataset().to_table(columns=[*t.features, t.label])
        rows = to_numpy({c: read.column(c).to_numpy() for c in read.column_names}, t.features, t.label)
        parts.append(TensorDataset(torch.from_numpy(rows["x"]), torch.from_numpy(rows["y"])))
    return DataSplits(*parts, info=table_info(tables))
