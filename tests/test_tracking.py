"""`tracking.Run` owns a run's life on a real MLflow SQLite store: start, each epoch logged once, a failure with
its reason, a resume that continues the run, a finish; a failed resume of a FINISHED run keeps that record; a
run another process ended stays as it ended; `reap` marks KILLED the runs whose client died, and only those."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import mlflow
import pytest
import torch

from conftest import REPO
from raycraft import tracking
from raycraft.errors import Stopped, UserError
from raycraft.tracking import Run


@pytest.fixture
def uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def started(uri: str, name: str = "r", tags: dict[str, str] | None = None) -> Run:
    return Run.start(uri, "tracking-test", name, {"lr": 0.1, "model": "mlp"}, tags or {}, "model: mlp\n")


def steps(uri: str, run_id: str, key: str) -> list[int]:
    return sorted(int(m.step) for m in tracking.metric_history(uri, run_id, key))


def test_a_run_logs_each_epoch_once_fails_with_its_reason_resumes_and_finishes(uri):
    run = started(uri)
    record = tracking.get_run(uri, run.run_id)
    assert record.info.status == "RUNNING" and record.data.params == {"lr": "0.1", "model": "mlp"}
    assert tracking.download_text(uri, run.run_id, "config.yaml") == "model: mlp\n"

    assert run.log_epoch({"epoch": 0, "train_loss": 1.0})
    assert not run.log_epoch({"epoch": 0, "train_loss": 9.0})  # a restarted worker group logs its history again
    rank0 = Run(uri, run.run_id)  # another process's handle reads what the store holds
    assert [rank0.log_epoch(m) for m in ({"epoch": 0, "train_loss": 9.0}, {"epoch": 1, "train_loss": 0.5})] == [
        False, True]
    assert steps(uri, run.run_id, "epoch") == [0, 1] and steps(uri, run.run_id, "train_loss") == [0, 1]
    assert [m.value for m in tracking.metric_history(uri, run.run_id, "train_loss")] == [1.0, 0.5]
    run.log_metrics({"startup_s": 2.5})
    run.note_restore(2)
    run.note_restore(5)

    assert run.end_with(RuntimeError("out of memory")) == "FAILED"
    failed = tracking.get_run(uri, run.run_id)
    assert failed.info.status == "FAILED" and failed.info.end_time
    assert failed.data.tags[tracking.ERROR_TAG] == "RuntimeError: out of memory"
    assert failed.data.tags[tracking.RESTORES_TAG] == "2,5" and failed.data.metrics["startup_s"] == 2.5

    resumed = Run.resume(uri, run.run_id)
    assert resumed.before.status == "FAILED"
    again = tracking.get_run(uri, run.run_id)
    assert again.info.status == "RUNNING" and tracking.ERROR_TAG not in again.data.tags
    for epoch, loss in ((0, 7.0), (1, 7.0), (2, 0.25)):
        resumed.log_epoch({"epoch": epoch, "train_loss": loss})
    resumed.end()
    done = tracking.get_run(uri, run.run_id)
    assert done.info.status == "FINISHED" and tracking.ERROR_TAG not in done.data.tags
    assert steps(uri, run.run_id, "epoch") == [0, 1, 2]
    assert [m.value for m in tracking.metric_history(uri, run.run_id, "train_loss")] == [1.0, 0.5, 0.25]


def test_a_failed_resume_of_a_finished_run_keeps_the_finished_record(uri):
    run = started(uri)
    run.end()
    finished = tracking.get_run(uri, run.run_id).info
    time.sleep(0.01)  # a later end time would show
    resumed = Run.resume(uri, run.run_id)
    assert tracking.get_run(uri, run.run_id).info.status == "RUNNING"
    assert resumed.end_with(Stopped(signal.SIGTERM)) == "KILLED"
    after = tracking.get_run(uri, run.run_id)
    assert (after.info.status, after.info.end_time) == ("FINISHED", finished.end_time)
    assert after.data.tags[tracking.FAILED_RESUME_TAG] == "stopped by SIGTERM"
    assert tracking.ERROR_TAG not in after.data.tags


def test_a_run_another_process_ended_stays_as_it_ended(uri):
    run = started(uri)
    Run(uri, run.run_id).end("KILLED", "the sweep's scheduler stopped it")
    assert run.end_with(KeyboardInterrupt()) == "KILLED"
    record = tracking.get_run(uri, run.run_id)
    assert record.info.status == "KILLED"
    assert record.data.tags[tracking.ERROR_TAG] == "the sweep's scheduler stopped it"


def test_metrics_and_params_beyond_one_batch_are_all_logged(uri):
    run = Run.start(uri, "tracking-test", "wide", {f"p{i}": i for i in range(250)}, {}, "")
    run.log_metrics({f"m{i}": float(i) for i in range(2500)}, step=3)
    record = tracking.get_run(uri, run.run_id)
    assert len(record.data.params) == 250 and len(record.data.metrics) == 2500
    assert record.data.metrics["m2499"] == 2499.0 and steps(uri, run.run_id, "m7") == [3]


def dead_client() -> str:
    """A CLIENT_TAG of a process on this host that has exited."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    return f"{socket.gethostname()}:{gone.pid}:{time.time():.2f}"


def test_reap_marks_killed_the_runs_of_dead_clients_with_their_trials(uri):
    dead, away_stale, away_fresh, live = (started(uri, name) for name in ("dead", "away-stale", "away-fresh", "live"))
    trial = started(uri, "trial", {tracking.PARENT_TAG: dead.run_id})
    started(uri, "unheld")  # no client tag: nobody ever held it, so nobody can tell it died
    beat = int(time.time()) - 600  # tagged after the starts, which reap too
    dead.set_tags({tracking.CLIENT_TAG: dead_client(), tracking.HEARTBEAT_TAG: str(beat)})
    away_stale.set_tags({tracking.CLIENT_TAG: "elsewhere:1:1.00", tracking.HEARTBEAT_TAG: str(beat)})
    away_fresh.set_tags({tracking.CLIENT_TAG: "elsewhere:1:1.00", tracking.HEARTBEAT_TAG: f"{time.time():.0f}"})
    with live.heartbeat():
        held = tracking.get_run(uri, live.run_id).data.tags
        assert held[tracking.CLIENT_TAG] == tracking.client_id() and f":{os.getpid()}:" in held[tracking.CLIENT_TAG]
        assert abs(float(held[tracking.HEARTBEAT_TAG]) - time.time()) < 60
        assert sorted(tracking.reap(uri)) == sorted([dead.run_id, trial.run_id, away_stale.run_id])

    status = {r.info.run_name: r.info.status for r in tracking.search_runs(uri, "tracking-test")}
    assert status == {"dead": "KILLED", "trial": "KILLED", "away-stale": "KILLED", "away-fresh": "RUNNING",
                      "unheld": "RUNNING", "live": "RUNNING"}
    record = tracking.get_run(uri, dead.run_id)
    assert record.info.end_time == beat * 1000
    assert "stopped without ending the run" in record.data.tags[tracking.ERROR_TAG]
    assert tracking.reap(uri) == []


def test_every_new_run_reaps_and_a_trial_has_no_heartbeat_of_its_own(uri):
    dead = started(uri, "dead")
    dead.set_tags({tracking.CLIENT_TAG: dead_client(), tracking.HEARTBEAT_TAG: f"{time.time():.0f}"})
    sweep = started(uri, "sweep")
    sweep.set_tags({tracking.COMMAND_TAG: "raycraft tune sweep.yaml", "mlflow.user": "someone"})
    trial = started(uri, "trial", {tracking.PARENT_TAG: sweep.run_id})
    assert tracking.get_run(uri, dead.run_id).info.status == "KILLED"
    with trial.heartbeat():
        tags = tracking.get_run(uri, trial.run_id).data.tags
        assert tracking.CLIENT_TAG not in tags
    # a trial runs in a Ray process: the command and the user that started it are its sweep's
    assert tags[tracking.COMMAND_TAG] == "raycraft tune sweep.yaml" and tags["mlflow.user"] == "someone"
    assert tags[tracking.HOST_TAG] == socket.gethostname()


def test_store_queries(uri, tmp_path):
    first, second = started(uri, "first"), started(uri, "second")
    Run.start(uri, "other", "third", {}, {}, "")
    assert [r.info.run_name for r in tracking.search_runs(uri, "tracking-test")] == ["first", "second"]
    assert [r.info.run_name for r in tracking.search_runs(uri, None, newest_first=True, max_results=2)] == [
        "third", "second"]
    assert tracking.search_runs(uri, "no-such-experiment") == []
    assert sorted(tracking.experiments(uri).values()) == ["Default", "other", "tracking-test"]
    assert [r.info.run_id for r in tracking.search_runs(uri, "tracking-test", "attributes.run_name = 'second'")] \
        == [second.run_id]
    with pytest.raises(UserError, match="no MLflow run 'nope'"):
        tracking.get_run(uri, "nope")
    with pytest.raises(UserError, match="has no artifact 'checkpoint/state.pt'"):
        tracking.download_artifact(uri, first.run_id, "checkpoint/state.pt", tmp_path)
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "a.txt").write_text("a")
    first.log_artifacts(tmp_path / "plots", "plots")
    assert tracking.download_artifact(uri, first.run_id, "plots/a.txt", tmp_path / "out").read_text() == "a"


def test_a_logged_model_carries_each_final_metric_with_its_split(store_uri):
    """On a SQLite store and a tracking server: the model's metrics are each key's last value (the last epoch's,
    the test split's), linked to their split's dataset without adding a point to the run's history; the
    classifier loads back as MLflow serves it, and `load_model` gives its network."""
    run = Run.start(store_uri, "tracking-test", "model", {"lr": 0.1}, {}, "")
    run.log_datasets("digits", None, {"split_seed": 0}, ("train", "val", "test"))
    for epoch, (loss, accuracy) in enumerate([(3.0, 0.25), (2.0, 0.5), (1.0, 0.75)]):
        run.log_epoch({"epoch": epoch, "train_loss": loss, "val_accuracy": accuracy})
    run.log_metrics({"test_accuracy": 0.625})
    network, x = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)), torch.rand(5, 1, 2, 2)
    model_id = run.log_model(network, x, ["train_loss", "val_accuracy", "test_accuracy"], ["a", "b", "c"], "tiny")
    run.end()

    client = mlflow.MlflowClient(store_uri)
    model = client.get_logged_model(model_id)
    assert {m.key: (m.value, m.step) for m in model.metrics} == {
        "train_loss": (1.0, 2), "val_accuracy": (0.75, 2), "test_accuracy": (0.625, 0)}
    assert steps(store_uri, run.run_id, "val_accuracy") == [0, 1, 2]
    inputs = client.get_run(run.run_id).inputs.dataset_inputs
    digest = {d.tags[0].value: d.dataset.digest for d in inputs}
    assert len(set(digest.values())) == 3
    assert {m.key: m.dataset_digest for m in model.metrics} == {
        "train_loss": digest["train"], "val_accuracy": digest["val"], "test_accuracy": digest["test"]}
    assert model.tags["mlflow.note.content"].startswith("tiny It answers")
    assert client.get_run(run.run_id).outputs.model_outputs[0].step == 2

    mlflow.set_tracking_uri(store_uri)
    answers = mlflow.pyfunc.load_model(f"runs:/{run.run_id}/model").predict(x.numpy())
    expected = network(x).argmax(-1).tolist()
    assert answers["label"].tolist() == expected and answers["class"].tolist() == [("a", "b", "c")[i] for i in expected]
    assert torch.allclose(tracking.load_model(store_uri, run.run_id)(x), network(x))


def test_no_git_tags_outside_a_checkout_and_experiments_open_in_the_machine_learning_view(uri, tmp_path):
    assert tracking.git_provenance(tmp_path) == {}
    assert tracking.git_provenance(REPO)["mlflow.source.git.commit"]
    ignored = REPO / "build" / f"site-packages-{os.getpid()}"  # in the checkout, git-ignored: a venv's install
    ignored.mkdir(parents=True)
    try:
        assert tracking.git_provenance(ignored) == {}
    finally:
        ignored.rmdir()
    client = mlflow.MlflowClient(uri)
    older = client.create_experiment("older")  # made before raycraft set a kind
    genai = client.create_experiment("genai", tags={tracking.KIND_TAG: "genai_development"})
    tracking.experiment_id(uri, "older")
    tracking.experiment_id(uri, "genai")
    assert client.get_experiment(older).tags[tracking.KIND_TAG] == tracking.KIND
    assert client.get_experiment(genai).tags[tracking.KIND_TAG] == "genai_development"  # a user's choice stays
    new = tracking.experiment_id(uri, "new")
    assert client.get_experiment(new).tags[tracking.KIND_TAG] == tracking.KIND == "custom_model_development"


def test_system_metrics_are_sampled_while_the_run_is_held_and_only_if_asked(uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    runs = {asked: started(uri, f"system-{asked}") for asked in (True, False)}
    for asked, run in runs.items():
        with run.heartbeat(system_metrics=asked):
            time.sleep(1.5)
    sampled = steps(uri, runs[True].run_id, "system/cpu_utilization_percentage")
    assert len(sampled) >= 2 and "system/system_memory_usage_megabytes" in runs[True].fetch().data.metrics
    assert not [k for k in runs[False].fetch().data.metrics if k.startswith("system/")]
    time.sleep(1)  # the monitor stopped with the heartbeat: no sample comes after it
    assert steps(uri, runs[True].run_id, "system/cpu_utilization_percentage") == sampled
