"""Step-level training through the real `raycraft` executable: `log_every_steps` logs each interval once to
MLflow, `checkpoint_every_steps` checkpoints mid-epoch, and a run killed outright (SIGKILL) resumes from its
newest step checkpoint with MLflow's history of steps and epochs exact: every logged step and epoch once."""

from __future__ import annotations

import re
import signal
import subprocess

import psutil
import pytest
from mlflow.tracking import MlflowClient
from test_run_lifecycle import env_for, raycraft

from conftest import RAYCRAFT
from raycraft.tracking import RESTORES_TAG

pytestmark = pytest.mark.slow

STEPS = ["--set", "log_every_steps=10", "--set", "checkpoint_every_steps=20"]
JOB = ["train", "mlp", "--dataset", "digits", "--in-process", "--epochs", "2", "--batch-size", "16", *STEPS]
PER_EPOCH = 82  # ceil(1,298 training digits / 16)


def kill_after_step(folder, step: int) -> str:
    """Run JOB, SIGKILL it (no handler runs) once it printed its line for `step`; the run id."""
    proc = subprocess.Popen([str(RAYCRAFT), *JOB], cwd=folder, env=env_for(folder), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if re.match(rf"step {step}/", line):
            break
    assert proc.poll() is None, "".join(lines)[-3000:]
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    for child in children:
        if child.is_running():
            child.kill()
    return re.search(r"MLflow run (\w{32})", "".join(lines)).group(1)


def test_a_killed_run_resumes_from_its_step_checkpoint_with_exact_history(tmp_path):
    run_id = kill_after_step(tmp_path, 50)  # the newest checkpoint is the one after step 40
    out = raycraft(tmp_path, "train", "--resume", run_id, *STEPS)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "resuming at batch 40 of epoch 1" in out.stdout + out.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    steps = [int(m.step) for m in client.get_metric_history(run_id, "global_step")]
    assert sorted(steps) == list(range(10, 2 * PER_EPOCH + 1, 10))  # each once, none lost
    losses = client.get_metric_history(run_id, "step_train_loss")
    assert sorted(int(m.step) for m in losses) == sorted(steps)
    assert sorted(int(m.step) for m in client.get_metric_history(run_id, "epoch")) == [0, 1]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[RESTORES_TAG] == "0"
    assert run.data.metrics["test_accuracy"] > 0.8
