"""A real scaling search as Ray Tune trials: the driver SIGKILLed after some points finished, then resumed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import kill_when
from raycraft.sweep.engine import PARENT_TAG

pytestmark = [pytest.mark.slow, pytest.mark.heavy]  # about 5 min on 2 cores

POINT_TAG = "raycraft.param.point"


def _cli(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "raycraft"), "scaling", *args]


def _children(client: MlflowClient, exp_id: str) -> list:
    return client.search_runs([exp_id], f"tags.`{PARENT_TAG}` != ''")


def test_killed_scaling_search_resumes_with_each_point_once(mlflow_uri, tmp_path):
    data = {"name": "mlp_kill", "experiment": "scaling-kill", "concurrency": 2,
            "job": {"model": "mlp", "dataset": "digits", "model_args": {"norm": "none"}, "batch_size": 64},
            "sizes": [{"hidden": [w]} for w in (4, 8, 16, 32, 64)],
            "data": [{"epochs": e} for e in (1, 2, 3)], "metric": "val_loss", "holdout": 1}
    path = tmp_path / "mlp_kill.yaml"
    path.write_text(yaml.safe_dump(data))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = [str(path), "--tracking-uri", mlflow_uri]
    client = MlflowClient(mlflow_uri)
    driver = subprocess.Popen(_cli(*args), cwd=tmp_path, env=env, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def two_finished() -> dict[str, int]:
        exp = client.get_experiment_by_name("scaling-kill")
        done = [k for k in _children(client, exp.experiment_id) if k.info.status == "FINISHED"] if exp else []
        return {k.info.run_id: k.info.end_time for k in done} if len(done) >= 2 else {}

    before = kill_when(driver, two_finished)

    resumed = subprocess.run(_cli(*args, "--resume", "mlp_kill"), cwd=tmp_path, env=env, timeout=900,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "held-out relative error" in resumed.stdout
    exp = client.get_experiment_by_name("scaling-kill")
    kids = _children(client, exp.experiment_id)
    assert sorted(int(k.data.tags[POINT_TAG]) for k in kids) == list(range(15))  # each point once
    for k in kids:
        assert k.info.status == "FINISHED"
        epochs = [int(m.step) for m in client.get_metric_history(k.info.run_id, "epoch")]
        assert epochs == list(range(data["data"][int(k.data.tags[POINT_TAG]) % 3]["epochs"]))
        assert {"scaling.N", "scaling.D", "scaling.C", "scaling.flops_counted"} <= set(k.data.metrics)
        if k.info.run_id in before:  # finished before the kill: not run again
            assert k.info.end_time == before[k.info.run_id]
    # training, not a trial waiting for its workers' CPUs: from the end of each run's start-up to its end
    spans = sorted((k.info.start_time + 1000 * k.data.metrics["startup_s"], k.info.end_time) for k in kids)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False)), "no two trials trained at once"
    (parent,) = client.search_runs([exp.experiment_id], "tags.`raycraft.kind` = 'scaling'")
    assert parent.info.status == "FINISHED" and parent.data.tags["raycraft.kind"] == "scaling"
    assert {"L_ND.alpha", "heldout_rel_error.L_ND", "flops_counted_over_6ND"} <= set(parent.data.metrics)
    assert parent.data.metrics["trials"] == 15
