"""Every run ends in a true state, through the real `raycraft` executable: SIGTERM and SIGINT end it KILLED
with the signal named; a client killed outright is found by `raycraft runs` (and by the next run) and marked
KILLED; a diverging run ends FAILED saying truthfully whether a checkpoint is left; `--resume` continues."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from conftest import RAYCRAFT

pytestmark = pytest.mark.slow

FAST = ["mlp", "--dataset", "digits"]


def env_for(folder: Path) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}


def raycraft(folder: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(RAYCRAFT), *args], cwd=folder, env=env_for(folder), capture_output=True, text=True,
                          timeout=timeout)


def signalled(folder: Path, args: list[str], sig: int, after: str = "epoch 2/") -> tuple[int, str, str]:
    """Start `raycraft ARGS`, send `sig` once it has printed a line starting with `after`; (exit code, output,
    run id). Every process it started that outlives it (SIGKILL leaves Ray's agents behind) is ended by pid."""
    proc = subprocess.Popen([str(RAYCRAFT), *args], cwd=folder, env=env_for(folder), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(after):
            break
    assert proc.poll() is None, "".join(lines)[-3000:]
    started = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(sig)
    rest = proc.communicate(timeout=120)[0]
    for child in started:
        if child.is_running():
            child.kill()
    out = "".join(lines) + rest
    return proc.returncode, out, re.search(r"MLflow run (\w{32})", out).group(1)


def run_of(folder: Path, run_id: str):
    return MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").get_run(run_id)


def epochs_logged(folder: Path, run_id: str) -> list[int]:
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    return sorted(int(m.step) for m in client.get_metric_history(run_id, "epoch"))


@pytest.mark.parametrize("mode, sig", [("in-process", signal.SIGTERM), ("ray", signal.SIGINT)])
def test_a_signal_ends_the_run_killed_and_resume_continues(tmp_path, mode, sig):
    extra = ["--in-process"] if mode == "in-process" else []
    code, out, run_id = signalled(tmp_path, ["train", *FAST, "--epochs", "400", *extra], sig)
    name = signal.Signals(sig).name
    assert code == 128 + sig, out[-3000:]
    assert f"stopped by {name}" in out and f"--resume {run_id}" in out and "Traceback" not in out
    run = run_of(tmp_path, run_id)
    assert run.info.status == "KILLED" and run.info.end_time
    assert run.data.tags["raycraft.error"] == f"stopped by {name}"

    total = len(epochs_logged(tmp_path, run_id)) + 2
    done = raycraft(tmp_path, "train", "--resume", run_id, "--epochs", str(total), *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    run = run_of(tmp_path, run_id)
    assert run.info.status == "FINISHED" and "raycraft.error" not in run.data.tags
    assert epochs_logged(tmp_path, run_id) == list(range(total))


def test_sigterm_ends_an_rl_run_killed(tmp_path):
    code, out, run_id = signalled(tmp_path, ["rl", "dqn", "--env", "CartPole-v1", "--timesteps", "10000000",
                                             "--set", "steps_per_iter=200", "--set", "checkpoint_every=1"],
                                  signal.SIGTERM, after="iter 2 ")
    assert code == 128 + signal.SIGTERM and f"--resume {run_id}" in out, out[-3000:]
    run = run_of(tmp_path, run_id)
    assert run.info.status == "KILLED" and run.data.tags["raycraft.error"] == "stopped by SIGTERM"
    logged = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").list_artifacts(run_id, "checkpoint")
    assert logged, "a stopped run logs its last checkpoint, for --resume on another machine"


def test_a_killed_client_is_marked_killed_by_runs_and_by_the_next_run(tmp_path):
    _, _, first = signalled(tmp_path, ["train", *FAST, "--epochs", "400", "--in-process"], signal.SIGKILL)
    assert run_of(tmp_path, first).info.status == "RUNNING"  # nobody was left to end it
    listed = raycraft(tmp_path, "runs")
    assert listed.returncode == 0, listed.stderr
    assert f"marked KILLED (their client had died): {first}" in listed.stdout
    run = run_of(tmp_path, first)
    assert run.info.status == "KILLED" and "stopped without ending the run" in run.data.tags["raycraft.error"]
    assert run.info.end_time == int(run.data.tags["raycraft.heartbeat"]) * 1000

    _, _, second = signalled(tmp_path, ["train", *FAST, "--epochs", "400"], signal.SIGKILL)
    assert run_of(tmp_path, second).info.status == "RUNNING"
    assert raycraft(tmp_path, "train", *FAST, "--epochs", "1", "--in-process").returncode == 0
    assert run_of(tmp_path, second).info.status == "KILLED"


def test_divergence_fails_the_run_and_says_which_checkpoint_is_left(tmp_path):
    fresh = raycraft(tmp_path, "train", *FAST, "--epochs", "3", "--in-process", "--set", "optim.lr=1e6")
    assert fresh.returncode == 1, fresh.stderr[-3000:]
    assert "diverged in epoch 1" in fresh.stderr and "No checkpoint was written" in fresh.stderr
    nan = raycraft(tmp_path, "train", *FAST, "--epochs", "3", "--in-process", "--set", "optim.lr=1e6",
                   "--set", "optim.name=sgd")
    assert nan.returncode == 1 and "non-finite train_loss" in nan.stderr and "No checkpoint" in nan.stderr

    code, _, run_id = signalled(tmp_path, ["train", *FAST, "--epochs", "400", "--in-process"], signal.SIGTERM)
    kept = sorted((tmp_path / "ray_results" / f"raycraft-{run_id}").glob("epoch_*"))[-1]
    diverged = raycraft(tmp_path, "train", "--resume", run_id, "--epochs", "400", "--set", "optim.lr=1e6")
    assert diverged.returncode == 1, diverged.stderr[-3000:]
    message = " ".join(diverged.stderr.split())
    assert f"The last good checkpoint ({kept.name}) is kept at {kept}" in message, message
    run = run_of(tmp_path, run_id)
    assert run.info.status == "FAILED" and "diverged in epoch" in run.data.tags["raycraft.error"]
    assert epochs_logged(tmp_path, run_id) == list(range(int(kept.name[6:]) + 1))  # no diverged epoch logged

    healed = raycraft(tmp_path, "train", "--resume", run_id, "--epochs", str(int(kept.name[6:]) + 3),
                      "--set", "optim.lr=1e-3")  # a resumed run keeps the config it last ran with
    assert healed.returncode == 0, healed.stderr[-3000:]
    assert run_of(tmp_path, run_id).info.status == "FINISHED"


def test_the_guard_is_configurable_and_validated(tmp_path):
    off = raycraft(tmp_path, "train", *FAST, "--epochs", "2", "--in-process", "--set", "optim.lr=1e6",
                   "--set", "guard.loss_factor=0")
    assert off.returncode == 0, off.stderr[-2000:]  # the user turned the guard off: the run ends as it trained
    bad = raycraft(tmp_path, "train", *FAST, "--set", "guard.loss_factor=0.5")
    assert bad.returncode == 2 and "guard.loss_factor: 0.5" in bad.stderr


def test_heartbeat_names_the_client_and_a_live_client_is_not_reaped(tmp_path):
    proc = subprocess.Popen([str(RAYCRAFT), "train", *FAST, "--epochs", "400", "--in-process"], cwd=tmp_path,
                            env=env_for(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("epoch 2/"):
                break
        listed = raycraft(tmp_path, "runs")
        assert "RUNNING" in listed.stdout and "marked KILLED" not in listed.stdout
        run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(["0", "1"])[0]
        host, pid, started = run.data.tags["raycraft.client"].split(":")
        assert int(pid) == proc.pid and abs(float(started) - psutil.Process(proc.pid).create_time()) < 1
        assert abs(float(run.data.tags["raycraft.heartbeat"]) - time.time()) < 120
    finally:
        proc.terminate()
        proc.communicate(timeout=120)
