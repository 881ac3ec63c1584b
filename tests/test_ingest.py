"""Ray Data ingest on a real Ray Train run: each worker's training shard is disjoint from the others' and
together they cover the epoch but for the n mod world rows Ray Data holds back (`raycraft.train.ingest`); val
and test shards are disjoint and complete; a shard is the same every epoch, reshuffled by seed + epoch, so an
epoch resumed `skip` batches in sees exactly the rest of it: no sample repeated, none skipped."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import ray.cloudpickle
import ray.train
import torch
from ray.train.torch import TorchTrainer
from torch.utils.data import TensorDataset

from raycraft.data.base import DataSplits
from raycraft.data.streams import from_memory
from raycraft.train.ingest import ShardConfig, StreamBatches
from raycraft.train.loop import Batches

pytestmark = pytest.mark.slow

ROWS = {"train": 101, "val": 23, "test": 17}  # odd, so the training split cannot be halved
BATCH, SKIP, WORLD = 8, 3, 2


def ids(batches) -> list[int]:
    return [int(i) for _, y in batches for i in y]


def record_shards(config: dict) -> None:
    """Each worker writes what it iterated: two epochs of its training shard, epoch 1 again resumed SKIP
    batches in, and its val and test shards."""
    ctx = ray.train.get_context()
    world, shard = ctx.get_world_size(), ray.train.get_dataset_shard
    train = StreamBatches(shard("train"), config["rows"] // world, BATCH, buffer=16, seed=7)
    seen = {}
    for epoch in (0, 1):
        train.epoch = epoch
        seen[f"epoch{epoch}"] = ids(train)
    train.skip = SKIP
    seen["resumed"] = ids(train)
    seen["steps"] = len(train)
    for split in ("val", "test", "test_full"):
        seen[split] = ids(StreamBatches(shard(split), 0, BATCH))
    Path(config["out"], f"rank{ctx.get_world_rank()}.json").write_text(json.dumps(seen))


def splits_of_ids() -> DataSplits:
    start, parts = 0, []
    for n in ROWS.values():
        y = torch.arange(start, start + n)
        parts.append(TensorDataset(y.float().unsqueeze(1), y))
        start += n
    return DataSplits(*parts)


def test_shards_are_disjoint_cover_the_epoch_and_resume_exactly(ray_session, tmp_path):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import tests/
    source = from_memory(splits_of_ids())
    TorchTrainer(record_shards, train_loop_config={"rows": ROWS["train"], "out": str(tmp_path)},
                 datasets=source.datasets(), dataset_config=ShardConfig(),
                 scaling_config=ray.train.ScalingConfig(num_workers=WORLD, resources_per_worker={"CPU": 0.5}),
                 run_config=ray.train.RunConfig(storage_path=str(tmp_path / "ray"))).fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    train_ids = set(range(ROWS["train"]))
    for epoch in ("epoch0", "epoch1"):
        shards = [set(r[epoch]) for r in ranks]
        assert all(len(r[epoch]) == ROWS["train"] // WORLD for r in ranks)  # every rank takes the same steps
        assert not shards[0] & shards[1]
        assert len(train_ids - shards[0] - shards[1]) == ROWS["train"] % WORLD  # the remainder held back
    for r in ranks:
        assert set(r["epoch0"]) == set(r["epoch1"]) and r["epoch0"] != r["epoch1"]  # one shard, reshuffled
        assert r["resumed"] == r["epoch1"][SKIP * BATCH:]  # nothing repeated, nothing skipped
        assert r["steps"] == -(-(ROWS["train"] // WORLD) // BATCH)
    for split, first in (("val", ROWS["train"]), ("test", ROWS["train"] + ROWS["val"])):
        shards = [r[split] for r in ranks]
        assert not set(shards[0]) & set(shards[1])
        assert sorted(shards[0] + shards[1]) == list(range(first, first + ROWS[split]))
    assert all(sorted(r["test_full"]) == list(range(first, first + ROWS["test"])) for r in ranks)


def test_in_memory_batches_resume_with_the_rest_of_the_epoch():
    data = TensorDataset(torch.zeros(50, 1), torch.arange(50))
    full = Batches(data, 4, rank=1, world=2, shuffle=True, seed=3)
    full.epoch = 2
    resumed = Batches(data, 4, rank=1, world=2, shuffle=True, seed=3)
    resumed.epoch, resumed.skip = 2, 2
    assert ids(resumed) == ids(full)[8:]
