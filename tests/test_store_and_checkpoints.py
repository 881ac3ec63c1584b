"""A store and checkpoints that survive what users do: simultaneous first runs on a new SQLite store, a broken
store, a truncated newest checkpoint, a resume with no intact checkpoint, a failed resume of a finished run,
and the folders a killed write leaves behind. All through the real `raycraft` executable."""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_run_lifecycle import FAST, epochs_logged, raycraft, run_of

pytestmark = pytest.mark.slow


def trained(folder: Path, *args: str) -> str:
    out = raycraft(folder, "train", *FAST, *args)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split("run id: ")[1].split()[0]


def test_four_simultaneous_first_runs_share_a_new_store(tmp_path):
    assert not (tmp_path / "mlflow.db").exists()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda seed: raycraft(tmp_path, "train", *FAST, "--epochs", "1", "--in-process",
                                                      "--seed", str(seed)), range(4)))
    assert [r.returncode for r in results] == [0] * 4, [r.stderr[-1500:] for r in results]
    runs = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(["1"])
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 4
    assert trained(tmp_path, "--epochs", "1", "--in-process")  # and the store still works afterwards


def test_a_broken_store_is_reported_with_what_to_do(tmp_path):
    (tmp_path / "mlflow.db").write_bytes(b"not a database" * 100)
    out = raycraft(tmp_path, "train", *FAST, "--epochs", "1", "--in-process")
    assert out.returncode == 2, out.stderr[-3000:]
    message = " ".join(out.stderr.split())
    assert f"the MLflow store {tmp_path / 'mlflow.db'} cannot be opened" in message
    assert f"mv {tmp_path / 'mlflow.db'} {tmp_path / 'mlflow.db'}.broken" in message and "Traceback" not in message


# The checksums are checked by one function on both paths; the Ray path (about 100 s) runs with `-m heavy`.
@pytest.mark.parametrize("mode", ["in-process", pytest.param("ray", marks=pytest.mark.heavy)])
def test_a_corrupt_newest_checkpoint_is_skipped_on_resume(tmp_path, mode):
    extra = ["--in-process"] if mode == "in-process" else []
    run_id = trained(tmp_path, "--epochs", "3", "--set", "keep_checkpoints=3", *extra)
    run_dir = tmp_path / "ray_results" / f"raycraft-{run_id}"
    newest = run_dir / "epoch_0002" / "state.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a full disk
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if snapshot.exists():  # a kill between the upload and Ray Train's record of it
        snapshot.unlink()

    resumed = raycraft(tmp_path, "train", "--resume", run_id, "--epochs", "5", *extra)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    note = " ".join(resumed.stderr.split())
    assert "skipping checkpoint epoch_0002 (state.pt does not match its checksum" in note
    assert "resuming from epoch_0001" in note
    run = run_of(tmp_path, run_id)
    assert run.info.status == "FINISHED" and run.data.tags["raycraft.restored_at_epochs"] == "2"
    assert "epoch_0002" in run.data.tags["raycraft.skipped_checkpoints"]
    assert epochs_logged(tmp_path, run_id) == list(range(5))


def test_a_resume_without_an_intact_checkpoint_leaves_the_finished_run_alone(tmp_path):
    run_id = trained(tmp_path, "--epochs", "2", "--in-process")
    before = run_of(tmp_path, run_id).info
    for state in (tmp_path / "ray_results").rglob("state.pt"):
        state.write_bytes(b"")
    out = raycraft(tmp_path, "train", "--resume", run_id, "--epochs", "4")
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"run {run_id} has no intact checkpoint" in " ".join(out.stderr.split())
    after = run_of(tmp_path, run_id).info
    assert (after.status, after.end_time) == ("FINISHED", before.end_time)


def test_a_failed_resume_keeps_the_finished_record(tmp_path):
    run_id = trained(tmp_path, "--epochs", "2", "--in-process")
    before = run_of(tmp_path, run_id).info
    out = raycraft(tmp_path, "train", "--resume", run_id, "--epochs", "4", "--set", "optim.lr=1e6")
    assert out.returncode == 1 and "diverged in epoch 3" in out.stderr, out.stderr[-3000:]
    run = run_of(tmp_path, run_id)
    assert (run.info.status, run.info.end_time) == ("FINISHED", before.end_time)
    assert "diverged in epoch 3" in run.data.tags["raycraft.failed_resume"]


def test_partial_checkpoint_folders_of_dead_writers_are_removed(tmp_path):
    import tempfile

    gone = subprocess.Popen(["true"])
    gone.wait()
    orphan = Path(tempfile.gettempdir()) / f"raycraft-ckpt-{gone.pid}-test"
    orphan.mkdir()
    (orphan / "state.pt").write_bytes(b"x" * 1000)
    run_id = trained(tmp_path, "--epochs", "1", "--in-process")
    staging = tmp_path / "ray_results" / f"raycraft-{run_id}" / ".epoch_0001.partial"
    staging.mkdir()
    assert not orphan.exists()
    trained(tmp_path, "--epochs", "1", "--in-process")  # another run cleans what dead writers left
    assert staging.exists()  # only a run's own staging folders are its to clean: this one is of the first run
    assert raycraft(tmp_path, "train", "--resume", run_id, "--epochs", "2").returncode == 0
    assert not staging.exists()
    assert json.loads((tmp_path / "ray_results" / f"raycraft-{run_id}" / "epoch_0001" /
                       "raycraft-manifest.json").read_text())["files"]
