"""Real sweeps on a local Ray and a real MLflow store: ASHA with nested runs, and a killed driver resumed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import kill_when
from raycraft.sweep.config import load_sweep
from raycraft.sweep.engine import EARLY_TAG, PARENT_TAG, TRIAL_TAG, run_sweep

pytestmark = [pytest.mark.slow, pytest.mark.heavy]  # about 15-25 min each on a shared 2-core machine


def _sweep_data(tmp_path: Path, name: str, epochs: int, scheduler: str) -> dict:
    return {"name": name,
            "job": {"model": "mlp", "dataset": "digits", "epochs": epochs, "model_args": {"hidden": [32]},
                    "storage_path": str(tmp_path / "train")},
            # a good and a hopeless learning rate, each twice: ASHA must stop the hopeless ones at epoch 1
            "space": {"optim.lr": {"grid": [3e-3, 1e-7]}},
            "search": "random", "scheduler": {"name": scheduler, "grace_period": 1, "reduction_factor": 2},
            "metric": "val_accuracy", "mode": "max", "samples": 2, "concurrency": 1,
            "experiment": f"sweep-{name}", "storage_path": str(tmp_path / "tune")}


def _history(client: MlflowClient, run_id: str, key: str = "epoch") -> list[int]:
    return sorted(int(m.step) for m in client.get_metric_history(run_id, key))


def test_asha_sweep_nested_runs_early_stops_and_best(ray_session, mlflow_uri, tmp_path):
    sweep = load_sweep(data=_sweep_data(tmp_path, "asha4", epochs=3, scheduler="asha"))
    out = run_sweep(sweep, tracking_uri=mlflow_uri)
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("sweep-asha4")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    kids = [r for r in runs if PARENT_TAG in r.data.tags]
    assert len(parents) == 1 and parents[0].info.run_id == out.parent_run_id
    parent = client.get_run(out.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert len(kids) == 4 and all(k.data.tags[PARENT_TAG] == out.parent_run_id for k in kids)
    assert len({k.data.tags[TRIAL_TAG] for k in kids}) == 4

    early = [k for k in kids if k.data.tags[EARLY_TAG] == "true"]
    full = [k for k in kids if k.data.tags[EARLY_TAG] == "false"]
    assert {k.data.params["optim.lr"] for k in early} == {"1e-07"} and len(early) == 2
    assert {k.data.params["optim.lr"] for k in full} == {"0.003"} and len(full) == 2
    assert all(k.info.status == "FINISHED" and _history(client, k.info.run_id) == [0, 1, 2] for k in full), [
        (k.info.status, _history(client, k.info.run_id), k.data.tags.get("raycraft.error")) for k in full]
    assert all(k.info.status == "KILLED" and "test_accuracy" not in k.data.metrics for k in early), [
        (k.info.status, _history(client, k.info.run_id), sorted(k.data.metrics)) for k in early]

    top = max(k.data.metrics["val_accuracy"] for k in full)  # the two lr=0.003 trials may tie
    best = next(k for k in full if k.info.run_id == out.best_run_id)
    assert parent.data.tags["raycraft.best_run_id"] == out.best_run_id and best.data.metrics["val_accuracy"] == top
    assert parent.data.tags["best.optim.lr"] == "0.003"
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(best.data.metrics["val_accuracy"])
    assert parent.data.metrics["trials"] == 4 and parent.data.metrics["trials_early_stopped"] == 2
    assert parent.data.params["space.optim.lr"] == "grid[0.003, 1e-07]"
    arts = {a.path for a in client.list_artifacts(out.parent_run_id)} | {
        a.path for a in client.list_artifacts(out.parent_run_id, "plots")}
    assert {"best_config.yaml", "plots/metric_vs_params.png", "plots/learning_curves.png"} <= arts
    best_cfg = yaml.safe_load(Path(client.download_artifacts(out.parent_run_id, "best_config.yaml",
                                                             str(tmp_path))).read_text())
    assert best_cfg["optim"]["lr"] == 0.003


def _cli(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "raycraft"), "tune", *args]


def test_killed_driver_resumes_without_rerunning_finished_trials(mlflow_uri, tmp_path):
    """SIGKILL the `raycraft tune` process mid-sweep; `--resume NAME` completes it, each trial once."""
    data = _sweep_data(tmp_path, "resume4", epochs=4, scheduler="fifo")
    path = tmp_path / "resume4.yaml"
    path.write_text(yaml.safe_dump(data))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = [str(path), "--tracking-uri", mlflow_uri]
    driver = subprocess.Popen(_cli(*args), cwd=tmp_path, env=env, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = MlflowClient(mlflow_uri)

    def trial_finished_and_one_running() -> dict[str, tuple[int, int]]:
        exp = client.get_experiment_by_name("sweep-resume4")
        kids = client.search_runs([exp.experiment_id], f"tags.`{PARENT_TAG}` != ''") if exp else []
        done = [k for k in kids if k.info.status == "FINISHED"]
        running = [k for k in kids if k.info.status == "RUNNING" and _history(client, k.info.run_id)]
        if not (done and running):
            return {}
        return {k.data.tags[TRIAL_TAG]: (k.info.end_time, len(_history(client, k.info.run_id))) for k in done}

    finished_before = kill_when(driver, trial_finished_and_one_running)
    exp_id = client.get_experiment_by_name("sweep-resume4").experiment_id

    resumed = subprocess.run(_cli(*args, "--resume", "resume4"), cwd=tmp_path, env=env, timeout=600,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "Configuration for experiment" not in resumed.stdout  # Ray Tune's own console output stays off
    runs = client.search_runs([exp_id])
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    kids = [r for r in runs if PARENT_TAG in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.metrics["trials"] == 4
    assert len(kids) == 4 and len({k.data.tags[TRIAL_TAG] for k in kids}) == 4  # every trial once
    for k in kids:
        assert k.info.status == "FINISHED" and k.data.tags[PARENT_TAG] == parents[0].info.run_id
        assert _history(client, k.info.run_id) == [0, 1, 2, 3]  # each epoch exactly once
        trial = k.data.tags[TRIAL_TAG]
        if trial in finished_before:  # not run again: its run ended when it did, with the same history
            assert (k.info.end_time, len(_history(client, k.info.run_id))) == finished_before[trial]


def test_rl_sweep_reports_iterations_and_asha_stops_the_slower_trial(ray_session, mlflow_uri, tmp_path):
    """Two DQN trials ranked by env_steps after each iteration (deterministic): 200 steps per iteration
    beats 100, so ASHA stops the slower trial at its first rung; the other runs to its end."""
    sweep = load_sweep(data={
        "name": "rl2", "job": {"algo": "dqn", "env": "CartPole-v1", "timesteps": 400, "steps_per_iter": 100,
                               "learning_starts": 50, "eval_episodes": 1, "storage_path": str(tmp_path / "rl")},
        "space": {"steps_per_iter": {"grid": [200, 100]}}, "search": "random",
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "metric": "env_steps", "mode": "max", "samples": 1, "experiment": "sweep-rl2",
        "storage_path": str(tmp_path / "tune")})
    out = run_sweep(sweep, tracking_uri=mlflow_uri)
    client = MlflowClient(mlflow_uri)
    kids = {k.data.params["steps_per_iter"]: k for k in out.children}
    assert set(kids) == {"200", "100"}
    fast, slow = kids["200"], kids["100"]
    assert fast.data.tags[EARLY_TAG] == "false" and client.get_run(fast.info.run_id).info.status == "FINISHED"
    steps = _history(client, fast.info.run_id, "env_steps")  # RLlib may sample a step or two over
    assert len(steps) == 2 and 200 <= steps[0] < 300 and steps[1] >= 400
    assert {a.path for a in client.list_artifacts(fast.info.run_id)} >= {"policy", "returns.png"}
    assert slow.data.tags[EARLY_TAG] == "true" and client.get_run(slow.info.run_id).info.status == "KILLED"
    assert len(_history(client, slow.info.run_id, "env_steps")) < 4
    parent = client.get_run(out.parent_run_id)
    assert parent.data.tags["best.steps_per_iter"] == "200" and parent.data.metrics["trials_early_stopped"] == 1


def test_pbt_bottom_trial_takes_over_the_top_trials_weights(ray_session, mlflow_uri, tmp_path):
    """A good and a hopeless learning rate side by side: at a perturbation the hopeless trial (bottom half)
    must take over the good one's checkpoint, so its accuracy jumps far beyond what lr 1e-7 can reach, its
    epochs stay unique, and its run records the exploit and the config now in force."""
    data = _sweep_data(tmp_path, "pbt2", epochs=5, scheduler="pbt")
    data.update(samples=1, scheduler={"name": "pbt", "perturbation_interval": 1,
                                      "quantile_fraction": 0.5, "resample_probability": 0.0})
    out = run_sweep(load_sweep(data=data), tracking_uri=mlflow_uri)
    client = MlflowClient(mlflow_uri)
    kids = {k.data.params["optim.lr"]: client.get_run(k.info.run_id) for k in out.children}
    assert set(kids) == {"0.003", "1e-07"}
    good, bad = kids["0.003"], kids["1e-07"]
    exploits = {k: v for k, v in bad.data.tags.items() if k.startswith("raycraft.pbt.exploit.")}
    assert exploits and "raycraft.pbt.exploit.1" in exploits, bad.data.tags
    first = yaml.safe_load(exploits["raycraft.pbt.exploit.1"])
    assert first["from_trial"] == good.data.tags[TRIAL_TAG]
    assert all(k.info.status == "FINISHED" and _history(client, k.info.run_id) == [0, 1, 2, 3, 4]
               for k in (good, bad)), [(k.info.status, _history(client, k.info.run_id)) for k in (good, bad)]
    accuracy = {int(m.step): m.value for m in client.get_metric_history(bad.info.run_id, "val_accuracy")}
    assert accuracy[0] < 0.3 and accuracy[4] > 0.8, accuracy  # lr 1e-7 alone stays at chance
    explored = client.get_metric_history(bad.info.run_id, "pbt.optim.lr")
    assert [int(m.step) for m in explored][:1] == [first["at_epoch"] + 1]
    final_cfg = yaml.safe_load(Path(client.download_artifacts(bad.info.run_id, "config.yaml", str(tmp_path)))
                               .read_text())
    last = yaml.safe_load(exploits[max(exploits)])
    assert final_cfg["optim"]["lr"] == pytest.approx(last["optim.lr"])
    parent = client.get_run(out.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials"] == 2
