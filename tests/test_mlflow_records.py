"""What a user finds in MLflow after `raycraft train`, read back through MLflow's own client from one real run
(LeNet-5 on digits, 2 epochs, in-process): the logged model carries the run's final and test metrics and its
datasets; the run says who started it, with which command and code, and its status is MLflow's own; system
metrics cover the run and stop at its end; the experiment opens in MLflow's machine-learning view; and the
classifier, served by `mlflow models serve`, answers labels, class names and probabilities."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest

from conftest import REPO, end_process_tree, run_raycraft
from raycraft import tracking
from raycraft.cluster import free_port
from raycraft.data.base import DataConfig
from raycraft.registry import load_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, str, mlflow.MlflowClient, str]:
    """(the run's folder, its run id, a client of its store, what the command printed) of one finished
    `raycraft train` run, whose system metrics are sampled every second."""
    folder = tmp_path_factory.mktemp("records")
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"  # the child inherits it; a 2-epoch run is short
    try:
        out = run_raycraft(["train", "lenet5", "--dataset", "digits", "--epochs", "2", "--in-process",
                            "--experiment", "records"], folder)
    finally:
        del os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"]
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    (run,) = tracking.search_runs(f"sqlite:///{folder / 'mlflow.db'}", "records")
    return folder, run.info.run_id, mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}"), out.stdout


def logged_model(client: mlflow.MlflowClient, run_id: str):
    (output,) = client.get_run(run_id).outputs.model_outputs
    return client.get_logged_model(output.model_id), output.step


def test_the_logged_model_carries_the_final_and_test_metrics_with_their_datasets(trained):
    _, run_id, client, _ = trained
    run = client.get_run(run_id)
    model, step = logged_model(client, run_id)
    assert model.status == "READY" and model.source_run_id == run_id and model.name == "model" and step == 1
    metrics = {m.key: m for m in model.metrics}
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        history = client.get_metric_history(run_id, key)
        assert [m.step for m in history] == [0, 1], key  # linking added no point to the run's history
        assert metrics[key].value == history[-1].value == run.data.metrics[key] and metrics[key].step == 1
    assert {"test_loss", "test_accuracy"} <= set(metrics)
    assert metrics["test_accuracy"].value == run.data.metrics["test_accuracy"]
    contexts = {tag.value: d.dataset for d in run.inputs.dataset_inputs for tag in d.tags
                if tag.key == "mlflow.data.context"}
    assert set(contexts) == {"train", "val", "test"} and {d.name for d in contexts.values()} == {"digits"}
    for key, metric in metrics.items():
        split = key.split("_", 1)[0]
        if split in contexts:
            assert (metric.dataset_name, metric.dataset_digest) == ("digits", contexts[split].digest), key
    about = model.tags["mlflow.note.content"]
    assert "(batch, 1, 8, 8)" in about and "divided by 16" in about and "probabilities" in about
    assert model.tags["mlflow.source.git.commit"] == run.data.tags["mlflow.source.git.commit"]


def test_the_run_says_who_ran_what_and_ends_with_mlflows_own_status(trained):
    _, run_id, client, printed = trained
    run = client.get_run(run_id)
    tags = run.data.tags
    assert run.info.status == "FINISHED" and not [k for k in tags if k == "raycraft.status"]
    assert tags["mlflow.source.name"] == "raycraft train" and tags["mlflow.source.type"] == "LOCAL"
    assert tags[tracking.COMMAND_TAG].startswith("raycraft train lenet5 --dataset digits --epochs 2")
    assert tags["mlflow.user"] and tags[tracking.HOST_TAG]
    for package in tracking.VERSIONED:
        assert tags[f"{tracking.VERSION_PREFIX}{package}"] == importlib.metadata.version(package)
    git = ["git", "-C", str(REPO)]
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    dirty = bool(subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True).stdout.strip())
    assert tags["mlflow.source.git.commit"] == head and tags[tracking.DIRTY_TAG] == str(dirty).lower()
    assert client.get_experiment(run.info.experiment_id).tags[tracking.KIND_TAG] == "custom_model_development"
    # MLflow 3.17's UI shows runs and models (not GenAI's traces) when the link says so
    assert f"#/experiments/{run.info.experiment_id}/runs/{run_id}?workflowType=machine_learning" in printed

    system = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    assert system and "system/system_memory_usage_megabytes" in run.data.metrics
    assert max(m.timestamp for m in system) <= run.info.end_time  # the monitor stopped before the run ended
    assert run.data.params["system_metrics"] == "True"


def test_the_served_classifier_answers_labels_and_probabilities(trained):
    folder, run_id, _, _ = trained
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    with (folder / "serve.log").open("w") as log:
        server = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m",
                                   f"runs:/{run_id}/model", "--env-manager", "local", "-h", "127.0.0.1", "-p",
                                   str(port)], cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", server, folder / "serve.log")
        test = load_dataset("digits", DataConfig()).test
        x, y = (np.stack([test[i][j].numpy() for i in range(32)]) for j in (0, 1))
        answers = invoke(port, {"inputs": x.tolist()})
        plain = invoke(port, {"inputs": x.tolist(), "params": {"logits": True}})
    finally:
        end_process_tree(server.pid)
    assert len(answers) == 32 and set(answers[0]) == {"label", "class", "probabilities"}
    probabilities = np.array([a["probabilities"] for a in answers])
    assert probabilities.shape == (32, 10) and np.allclose(probabilities.sum(1), 1, atol=1e-5)
    labels = np.array([a["label"] for a in answers])
    assert (labels == probabilities.argmax(1)).all() and [a["class"] for a in answers] == [str(i) for i in labels]
    assert (labels == y).mean() > 0.5  # two epochs: better than chance (0.1) by far
    logits = np.array([a["logits"] for a in plain])
    softmax = np.exp(logits - logits.max(1, keepdims=True))
    assert np.allclose(softmax / softmax.sum(1, keepdims=True), probabilities, atol=1e-5)


def wait_for(url: str, server: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            assert server.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)


def invoke(port: int, body: dict) -> list[dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["predictions"]
