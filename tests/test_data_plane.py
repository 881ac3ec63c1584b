"""Datasets read from files stream through Ray Data into real Ray Train runs: a Parquet table and an image
folder train end to end (`data.ingest=auto` picks Ray Data for them), `raycraft eval` reads the same test split
in memory and agrees, pre-tokenised shards stream the same windows the in-memory reader makes, and bad data is
refused (exit 2) before Ray starts or an MLflow run exists."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import assert_refused, run_raycraft
from raycraft.config import build
from raycraft.data.base import DataConfig
from raycraft.data.streams import token_shards
from raycraft.data.text import token_shards as token_shards_in_memory
from raycraft.data.text import write_token_shards
from raycraft.evaluate import evaluate_run
from raycraft.runner import run_training
from raycraft.train.config import TrainConfig

pytestmark = pytest.mark.slow


def write_table(folder, rows: int, seed: int, name: str) -> None:
    """Three classes, each a Gaussian blob in 4 features: separable, so a short run learns them."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, rows)
    x = rng.normal(size=(rows, 4)) * 0.3 + np.eye(3, 4)[y] * 2
    pq.write_table(pa.table({**{f"f{i}": x[:, i] for i in range(4)}, "label": y}), folder / name)


@pytest.fixture
def table_dir(tmp_path):
    (tmp_path / "train").mkdir()
    for i in range(2):
        write_table(tmp_path / "train", 300, i, f"part-{i}.parquet")
    write_table(tmp_path, 90, 5, "val.parquet")
    write_table(tmp_path, 90, 6, "test.parquet")
    return tmp_path


def train(keys: dict, overrides: list[str], uri: str, storage: str):
    cfg, _ = build(TrainConfig, [{"epochs": 2, "workers": 1, "storage_path": storage, **keys}], overrides)
    return run_training(cfg, tracking_uri=uri)


@pytest.mark.heavy  # 90-550 s on 2 cores; its parts run by default: streaming (the image folder and token shards
# below, test_ingest), the table reader and its bad input (test_bad_table_is_refused_before_any_run)
def test_a_parquet_table_streams_and_eval_agrees(ray_session, table_dir, mlflow_uri, storage):
    out = train({"model": "mlp", "dataset": "table", "data": {"data_dir": str(table_dir)}}, [], mlflow_uri, storage)
    assert out.metrics["test_accuracy"] > 0.9
    run = MlflowClient(mlflow_uri).get_run(out.run_id)
    assert run.data.tags["raycraft.ingest"] == "ray_data" and run.info.status == "FINISHED"
    again = evaluate_run(out.run_id, tracking_uri=mlflow_uri)  # the in-memory reader, the same test split
    assert again["test_accuracy"] == pytest.approx(out.metrics["test_accuracy"], abs=1e-6)


def test_an_image_folder_streams_with_step_logging(ray_session, tmp_path, mlflow_uri, storage):
    rng = np.random.default_rng(0)
    for label, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        (tmp_path / f"c{label}").mkdir()
        for i in range(40):
            pixels = rng.integers(0, 60, (12, 12, 3)) + np.array(colour)
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(tmp_path / f"c{label}" / f"{i}.png")
    out = train({"model": "lenet5", "dataset": "image_folder", "batch_size": 8,
                 "data": {"data_dir": str(tmp_path), "image_size": 12}}, ["log_every_steps=2"], mlflow_uri, storage)
    assert out.metrics["test_accuracy"] > 0.8
    steps = [int(m.step) for m in MlflowClient(mlflow_uri).get_metric_history(out.run_id, "global_step")]
    assert steps == list(range(2, 2 * 8 + 1, 2))  # 58 training images: 8 batches of 8 per epoch


def test_token_shards_stream_the_windows_the_memory_reader_makes(ray_session, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps. " * (40 + 10 * i))
    write_token_shards("text_folder", DataConfig(data_dir=str(corpus)), tmp_path / "shards", shard_tokens=500)
    cfg = DataConfig(data_dir=str(tmp_path / "shards"), seq_len=32)
    source, memory = token_shards(cfg), token_shards_in_memory(cfg)
    streamed = source.datasets()["train"].take_all()
    assert source.rows["train"] == len(streamed) == len(memory.train)
    x, y = memory.train[np.arange(len(memory.train))]
    assert sorted(map(tuple, (r["x"] for r in streamed))) == sorted(map(tuple, x.tolist()))
    assert all((r["y"][:-1] == r["x"][1:]).all() for r in streamed)


def test_bad_table_is_refused_before_any_run(table_dir, tmp_path):
    for args, words in (
            (["--data-dir", str(table_dir), "--set", "data.label_column=target"],
             ["data.label_column", "'target'", "f0, f1, f2, f3, label"]),
            (["--data-dir", str(tmp_path / "nowhere")], ["--data-dir", "nowhere"])):
        out = run_raycraft(["train", "mlp", "--dataset", "table", *args], tmp_path)
        assert_refused(out, words)
    assert not (tmp_path / "mlflow.db").exists() or not MlflowClient(
        f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(["0"])
