"""Ray Data on the trainers' side: how each split is shared among workers (`ShardConfig`) and one worker's
shard as the loop's batches (`StreamBatches`).

The padding rule, beside the in-memory `Batches`' (which pads a training epoch with repeated examples): a
training epoch's shards are equal, so every rank takes the same number of steps, and Ray Data holds back the
n mod world rows left over (fewer than `world`, the same ones every epoch: the end of the fixed file order).
Validation and test shards are disjoint and complete, of unequal sizes, so summed metrics count each example
once. `test_full` is the whole test split, read by rank 0 alone for end-of-run artifacts.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ray.train
import torch
from ray.data import DataIterator, ExecutionOptions

EVAL_SPLITS = ("val", "test")


class ShardConfig(ray.train.DataConfig):
    """Ray Train's split of the run's datasets: train equally, val and test disjointly, `test_full` not at all;
    all read in order (`preserve_order`), which makes each worker's shard the same every epoch and lets a
    resumed epoch skip exactly the batches it already trained on. Ray Train calls `configure` once per dataset,
    when the workers first ask for its shards."""

    def __init__(self) -> None:
        super().__init__(datasets_to_split=["train", *EVAL_SPLITS],
                         execution_options=ExecutionOptions(preserve_order=True))

    def configure(self, datasets: dict[str, Any], world_size: int, worker_handles, worker_node_ids,
                  **kwargs) -> list[dict[str, DataIterator]]:
        rest = {name: ds for name, ds in datasets.items() if name not in EVAL_SPLITS}
        output = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
        for name, ds in datasets.items():
            if name in EVAL_SPLITS:
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                for i, split in enumerate(ds.streaming_split(world_size, equal=False)):
                    output[i][name] = split
        return output


class StreamBatches:
    """One worker's shard of a split as (x, y) batches on `device`, reshuffled each epoch through a buffer of
    `buffer` rows seeded by seed + epoch; `skip` batches of the epoch are read and dropped (a resumed epoch's
    first ones). `rows` is this worker's share of the split."""

    def __init__(self, shard: DataIterator, rows: int, batch_size: int, *, buffer: int = 0, seed: int = 0,
                 device: torch.device | str = "cpu") -> None:
        self.shard, self.rows, self.batch_size = shard, rows, batch_size
        self.buffer, self.seed, self.device = buffer, seed, torch.device(device)
        self.epoch, self.skip = 0, 0

    def examples(self) -> int:
        return self.rows

    def __len__(self) -> int:
        return math.ceil(self.rows / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        shuffle = {"local_shuffle_buffer_size": self.buffer, "local_shuffle_seed": self.seed + self.epoch} \
            if self.buffer else {}
        batches = self.shard.iter_torch_batches(batch_size=self.batch_size, device=self.device, **shuffle)
        for i, batch in enumerate(batches):
            if i >= self.skip:
                yield batch["x"], batch["y"]


@dataclass
class Streamed:
    """What workers need of a Ray Data source (the driver built its datasets): the model's shapes and the
    splits' row counts."""

    info: dict[str, Any]
    rows: dict[str, int]
