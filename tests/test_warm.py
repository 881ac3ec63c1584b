"""The warm process: commands forked from it behave as cold ones (output, exit codes, MLflow runs, Ctrl-C),
and it steps aside when raycraft's code changes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from raycraft.warm.server import code_snapshot

RAYCRAFT = str(Path(sys.executable).parent / "raycraft")


def test_code_snapshot_sees_edited_and_added_files(tmp_path):
    (tmp_path / "pkg").mkdir()
    module = tmp_path / "pkg" / "model.py"
    module.write_text("x = 1\n")
    (tmp_path / "pkg" / "notes.txt").write_text("not code")
    before = code_snapshot([tmp_path])
    assert code_snapshot([tmp_path]) == before
    os.utime(module, (time.time() + 10, time.time() + 10))
    edited = code_snapshot([tmp_path])
    assert edited != before
    (tmp_path / "pkg" / "new_model.py").write_text("y = 2\n")
    assert code_snapshot([tmp_path]) != edited


@pytest.mark.slow
def test_commands_run_in_forks_of_the_warm_process(tmp_path, mlflow_uri):
    env = {**os.environ, "RAYCRAFT_WARM_DIR": str(tmp_path / "warm")}

    def raycraft(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([RAYCRAFT, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    started = raycraft("warm", "start")
    assert started.returncode == 0, started.stderr
    try:
        models = raycraft("models")
        assert models.returncode == 0 and "lenet5" in models.stdout
        bad = raycraft("train", "lenett5", "--dataset", "digits")
        assert bad.returncode == 2 and "Did you mean 'lenet5'" in bad.stderr and "Traceback" not in bad.stderr
        train = raycraft("train", "lenet5", "--dataset", "digits", "--epochs", "1", "--in-process",
                         "--tracking-uri", mlflow_uri)
        assert train.returncode == 0, train.stderr
        run_id = re.search(r"run id: (\w+)", train.stdout).group(1)
        run = MlflowClient(mlflow_uri).get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.metrics["startup_s"] > 0
        assert (tmp_path / "ray_results" / f"raycraft-{run_id}" / "epoch_0000").is_dir()  # the caller's folder
        status = raycraft("warm", "status")
        assert "3 commands served" in status.stdout and "code current" in status.stdout

        # Ctrl-C on the caller reaches the forked command, which ends its run as a cold one would
        long = subprocess.Popen([RAYCRAFT, "train", "lenet5", "--dataset", "digits", "--epochs", "200",
                                 "--in-process", "--tracking-uri", mlflow_uri, "--experiment", "warm-ctrl-c"],
                                env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        client = MlflowClient(mlflow_uri)

        def runs() -> list:  # the session's store holds other tests' runs: only this experiment's
            experiment = client.get_experiment_by_name("warm-ctrl-c")
            return client.search_runs([experiment.experiment_id]) if experiment else []

        deadline = time.time() + 120
        while time.time() < deadline and not [r for r in runs() if "epoch" in r.data.metrics]:
            time.sleep(0.2)
        long.send_signal(signal.SIGINT)
        out, err = long.communicate(timeout=120)
        assert long.returncode == 130 and "stopped by SIGINT" in err, err
        assert [r.info.status for r in runs()] == ["KILLED"]
    finally:
        stopped = raycraft("warm", "stop")
    assert stopped.returncode == 0 and "stopped pid" in stopped.stdout
    assert "not running" in raycraft("warm", "status").stdout
