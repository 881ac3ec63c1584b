"""S3-compatible storage, against a real S3 API on loopback (moto's server, `s3_server`): the storage functions,
the checks that refuse bad locations and credentials before anything starts, and a real training whose
checkpoints, resume and MLflow artifacts live in the bucket without its secrets showing anywhere."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import assert_refused, run_raycraft
from raycraft import storage, tracking
from raycraft.cluster import free_port
from raycraft.config import build
from raycraft.errors import UserError
from raycraft.rl.config import RLConfig
from raycraft.train.config import build_config


@contextlib.contextmanager
def aws_env(**changes: str) -> Iterator[None]:
    """The AWS_* environment with `changes` while inside (the session's `s3_server` values afterwards)."""
    saved = {k: os.environ.get(k) for k in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def write(location: str, text: str) -> None:
    fs, path = storage.filesystem(location)
    with fs.open_output_stream(path) as out:
        out.write(text.encode())


def read(location: str) -> str:
    fs, path = storage.filesystem(location)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


@pytest.mark.parametrize("where", ["s3", "local"])
def test_files_written_are_listed_and_read_back(where, s3_server, tmp_path):
    root = f"{s3_server.bucket('round-trip')}/data" if where == "s3" else str(tmp_path / "data")
    if where == "local":
        for sub in ("train/cats", "train/dogs", "val"):
            (tmp_path / "data" / sub).mkdir(parents=True)
    names = ["train/cats/1.PNG", "train/cats/2.png", "train/dogs/3.png", "train/notes.txt", "val/4.png"]
    for name in names:
        write(f"{root}/{name}", name)
    storage.check_readable("--data-dir", root)
    storage.check_writable("storage_path", f"{root}/checkpoints")
    assert storage.list_dirs(f"{root}/train") == ["cats", "dogs"]
    images = storage.list_files(root, {".png"})
    assert images == sorted(f"{root}/{n}" for n in names if n.endswith(("png", "PNG")))
    assert [read(f) for f in images] == [n for n in names if n.lower().endswith(".png")]
    assert storage.list_files(root) == sorted(f"{root}/{n}" for n in names)
    assert storage.list_files(f"{root}/none") == [] and storage.list_dirs(f"{root}/none") == []
    assert storage.is_remote(root) == (where == "s3")


def test_bad_locations_are_refused_naming_the_field(s3_server):
    bucket = s3_server.bucket("checked")
    write(f"{bucket}/data/x.csv", "a,b\n")
    refusals = {
        ("storage_path", "s3://no-such-bucket/ckpt", "writable"): "bucket 'no-such-bucket'",
        ("--data-dir", "s3://no-such-bucket/data", "readable"): "bucket 'no-such-bucket'",
        ("--data-dir", f"{bucket}/no-such-prefix", "readable"): "does not exist",
        ("storage_path", "s3:///ckpt", "writable"): "names no bucket",
    }
    for (field, location, check), words in refusals.items():
        with pytest.raises(UserError, match=f"^{field}: .*{words}"):
            getattr(storage, f"check_{check}")(field, location)


def test_credentials_in_a_uri_are_refused_and_never_echoed(s3_server):
    key, secret = s3_server.env["AWS_ACCESS_KEY_ID"], s3_server.env["AWS_SECRET_ACCESS_KEY"]
    for check in (storage.check_readable, storage.check_writable):
        with pytest.raises(UserError, match="credentials in it") as refused:
            check("storage_path", f"s3://{key}:{secret}@checked/ckpt")
        assert secret not in str(refused.value) and key not in str(refused.value)
    assert storage.redact("s3://checked/a@b:c") == "s3://checked/a@b:c"  # `@` in a key is no credential


def test_wrong_credentials_and_a_store_that_is_down_are_said_as_such(s3_server):
    bucket = s3_server.bucket("denied")
    write(f"{bucket}/data/x.csv", "a,b\n")
    for wrong in ({"AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG0"}, {"AWS_SECRET_ACCESS_KEY": "wrong"}):
        with aws_env(**wrong):
            for check, field in ((storage.check_readable, "--data-dir"), (storage.check_writable, "storage_path")):
                with pytest.raises(UserError, match=f"^{field}: .*access denied: check AWS_ACCESS_KEY_ID"):
                    check(field, f"{bucket}/data")
    with aws_env(AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}"):
        started = time.time()
        with pytest.raises(UserError, match="^storage_path: the S3 endpoint AWS_ENDPOINT_URL=.* does not answer"):
            storage.check_writable("storage_path", f"{bucket}/ckpt")
        assert time.time() - started < storage.ENDPOINT_TIMEOUT_S + 1
    storage.check_readable("--data-dir", f"{bucket}/data")  # the right credentials again: a new filesystem


def all_runs(folder: Path) -> list:
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_a_run_checkpoints_resumes_and_logs_artifacts_in_the_bucket_without_its_secrets(s3_server, tmp_path):
    bucket = s3_server.bucket("raycraft-runs")
    keys = ["--set", f"storage_path={bucket}/ckpt", "--set", f"artifact_root={bucket}/mlflow"]
    first = run_raycraft(["train", "lenet5", "--dataset", "digits", "--epochs", "1", *keys], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run_id = first.stdout.split("run id: ")[1].split()[0]
    checkpoints = storage.list_files(f"{bucket}/ckpt/raycraft-{run_id}")
    assert f"{bucket}/ckpt/raycraft-{run_id}/epoch_0000/state.pt" in checkpoints, checkpoints

    resumed = run_raycraft(["train", "--resume", run_id, "--epochs", "2"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["raycraft.restored_at_epochs"] == "1"
    assert f"{bucket}/ckpt/raycraft-{run_id}/epoch_0001/state.pt" in storage.list_files(f"{bucket}/ckpt")

    artifacts = storage.list_files(f"{bucket}/mlflow")
    for name in ("config.yaml", "checkpoint/state.pt", "plots/curves.png"):
        assert any(a.endswith(f"/{run_id}/artifacts/{name}") for a in artifacts), (name, artifacts)
    assert any(a.endswith("/artifacts/MLmodel") for a in artifacts), artifacts  # the logged model
    assert not (tmp_path / "mlartifacts").exists() and not (tmp_path / "ray_results").exists()
    evaluated = run_raycraft(["eval", run_id], tmp_path)
    assert evaluated.returncode == 0 and "test_accuracy" in evaluated.stdout, evaluated.stderr[-3000:]

    config = storage.list_files(f"{bucket}/mlflow", {".yaml"})
    recorded = [*run.data.params.values(), *run.data.tags.values(), *(read(c) for c in config)]
    said = [out.stdout + out.stderr for out in (first, resumed, evaluated)]
    for secret in (s3_server.env["AWS_SECRET_ACCESS_KEY"], s3_server.env["AWS_ACCESS_KEY_ID"]):
        assert not [text for text in recorded + said if secret in text]

    # the experiment keeps the artifact root it was created with; a new one may have another (a folder)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking.experiment_id(uri, "raycraft", f"{bucket}/mlflow/") == run.info.experiment_id
    with pytest.raises(UserError, match=f"^artifact_root: experiment 'raycraft' keeps its artifacts at {bucket}/mlf"):
        tracking.experiment_id(uri, "raycraft", f"{bucket}/elsewhere")
    local = tracking.experiment_id(uri, "local", "artifacts")
    assert MlflowClient(uri).get_experiment(local).artifact_location == (Path.cwd() / "artifacts").as_uri()


def test_bad_storage_is_refused_before_any_run_exists(s3_server, tmp_path):
    bucket = s3_server.bucket("raycraft-refused")
    write(f"{bucket}/images/cat/1.png", "not read: refused before")
    train = ["train", "lenet5", "--epochs", "1"]
    secret = s3_server.env["AWS_SECRET_ACCESS_KEY"]
    refusals = [
        ([*train, "--dataset", "digits", "--set", "storage_path=s3://no-such-bucket/ckpt"], {},
         ["storage_path: bucket 'no-such-bucket'", "does not exist"]),
        ([*train, "--dataset", "image_folder", "--data-dir", f"{bucket}/images"], {"AWS_SECRET_ACCESS_KEY": "wrong"},
         ["--data-dir:", "access denied", "AWS_SECRET_ACCESS_KEY"]),
        ([*train, "--dataset", "digits", "--set",
          f"artifact_root=s3://{s3_server.env['AWS_ACCESS_KEY_ID']}:{secret}@{bucket[5:]}/x"], {},
         ["artifact_root:", "credentials in it"]),
    ]
    for args, env, words in refusals:
        with aws_env(**env):
            out = run_raycraft(args, tmp_path)
        assert_refused(out, words)
        assert secret not in out.stdout + out.stderr
    assert not (tmp_path / "mlflow.db").exists() or not all_runs(tmp_path)


def test_remote_storage_is_refused_where_checkpoints_stay_local():
    with pytest.raises(UserError, match="^storage_path: s3:// is for `raycraft train`"):
        build(RLConfig, [{"storage_path": "s3://bucket/rl"}])
    with pytest.raises(UserError, match="^storage_path: .* is remote; an --in-process run"):
        build_config({"model": "mlp", "storage_path": "s3://bucket/ckpt", "in_process": True})
