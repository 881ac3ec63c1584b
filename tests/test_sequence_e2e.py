"""Language modelling end to end on a real local Ray and MLflow store: train, sample, generate, LoRA fine-tune."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

from raycraft.data.text import shakespeare_plays
from raycraft.models.tokenizers import load
from raycraft.runner import run_training
from raycraft.train.config import build_config
from raycraft.train.loop import load_state

pytestmark = pytest.mark.slow

TINY = ["d_model=32", "n_heads=2", "n_layers=1", "d_ff=64", "data.seq_len=32"]


def _cli(*args: str, uri: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    return subprocess.run([sys.executable, "-m", "raycraft.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def _weights(uri: str, run_id: str, tmp) -> dict[str, torch.Tensor]:
    path = MlflowClient(uri).download_artifacts(run_id, "checkpoint/state.pt", str(tmp / run_id))
    return load_state(os.path.dirname(path))["model"]


def test_language_model_train_generate_and_lora_finetune(ray_session, mlflow_uri, storage, tmp_path):
    macbeth = shakespeare_plays()["macbeth"]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):  # four small documents: split by file into train / val / test
        (corpus / f"part{i}.txt").write_text(macbeth[i * 6000:(i + 1) * 6000])
    base = {"model": "transformer", "dataset": "text_folder", "epochs": 2, "storage_path": storage,
            "data": {"data_dir": str(corpus), "val_fraction": 0.25, "test_fraction": 0.25}}
    cfg, _ = build_config(base, TINY)
    out = run_training(cfg, tracking_uri=mlflow_uri)
    client = MlflowClient(mlflow_uri)
    metrics = client.get_run(out.run_id).data.metrics
    assert metrics["val_perplexity"] == pytest.approx(torch.tensor(metrics["val_loss"]).exp().item(), rel=1e-6)
    vocab = load(client.download_artifacts(out.run_id, "plots/tokenizer.json", str(tmp_path))).vocab_size
    assert metrics["val_loss"] < math.log(vocab) - 0.3 and metrics["train_tokens_per_s"] > 0  # beats uniform
    sample = client.download_artifacts(out.run_id, "epochs/epoch_0001/sample.txt", str(tmp_path))
    assert len(open(sample).read()) > 100

    gen = _cli("generate", out.run_id, "--prompt", "MACBETH:", "--tokens", "40", "--top-k", "5", uri=mlflow_uri)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("MACBETH:") and len(gen.stdout.rstrip("\n")) >= 40
    bad = _cli("generate", out.run_id, "--prompt", "MACBETH€", uri=mlflow_uri)
    assert bad.returncode == 2 and "'€'" in bad.stderr and "Traceback" not in bad.stderr

    # LoRA: start from the run's weights, train only the adapters
    lora, _ = build_config({**base, "epochs": 1, "init_from": out.run_id}, [*TINY, "lora.rank=4"])
    tuned = run_training(lora, tracking_uri=mlflow_uri)
    before, after = _weights(mlflow_uri, out.run_id, tmp_path), _weights(mlflow_uri, tuned.run_id, tmp_path)
    for name, w in before.items():
        assert torch.equal(after[name], w), name  # the base is frozen
    assert any(after[k].abs().sum() > 0 for k in after if k.endswith(".B"))  # the adapters moved
    gen = _cli("generate", tuned.run_id, "--prompt", "MACBETH:", "--tokens", "10", uri=mlflow_uri)
    assert gen.returncode == 0, gen.stderr


def test_lstm_trains_through_the_loop(ray_session, mlflow_uri, storage, tmp_path):
    corpus = tmp_path / "one"
    corpus.mkdir()
    (corpus / "play.txt").write_text(shakespeare_plays()["hamlet"][:12000])  # one file: split by position
    cfg, _ = build_config({"model": "lstm", "dataset": "text_folder", "epochs": 1, "storage_path": storage,
                           "data": {"data_dir": str(corpus)}}, ["hidden=32", "d_embed=16", "data.seq_len=24",
                                                                "bptt=8"])
    out = run_training(cfg, tracking_uri=mlflow_uri)
    assert out.metrics["val_loss"] < 4.0 and out.metrics["test_perplexity"] > 1
