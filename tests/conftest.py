"""Shared fixtures: one private local Ray for the session, a real MLflow SQLite store (and a real MLflow
tracking server), small real data."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from raycraft.cluster import free_port
from raycraft.config import load_yaml
from raycraft.errors import UserError

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
torch.set_num_threads(1)  # 2-core machines: more threads per process made small steps far slower

REPO = Path(__file__).resolve().parents[1]
RAYCRAFT = Path(sys.executable).with_name("raycraft")  # the installed executable, as a user runs it


def assert_refused(out, words) -> None:
    """`out` (a finished `raycraft` command) was refused as bad input: exit 2, no traceback, each of `words`."""
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert "Traceback" not in text
    for word in words:
        assert word in text, f"{word!r} missing from: {text}"


def run_raycraft(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """`raycraft ARGS` as a user runs it, in `cwd`, with its own MLflow store there (`cwd/mlflow.db`)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    return subprocess.run([str(RAYCRAFT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def assert_every_form_refused_alike(build, job: str, lines: list[str], override: str, message: str,
                                    folder: Path) -> None:
    """`build(mapping, overrides)` refuses a bad value given as `--set override` and as each config-file form in
    `lines` (appended to the YAML `job`) with the same `message`."""
    path = folder / "job.yaml"
    path.write_text(job)
    with pytest.raises(UserError) as by_set:
        build(load_yaml(path), [override])
    assert str(by_set.value) == message
    for line in lines:
        path.write_text(f"{job}{line}\n")
        with pytest.raises(UserError) as by_file:
            build(load_yaml(path), [])
        assert str(by_file.value) == message, line


@pytest.fixture(scope="session", autouse=True)
def fresh_cache(tmp_path_factory):
    """Caches (FID classifiers, BPE merges) start empty, as on a fresh machine, and never leak into the user's.
    Autouse, so it is set before Ray starts and its workers inherit it."""
    os.environ["RAYCRAFT_CACHE"] = str(tmp_path_factory.mktemp("raycraft-cache"))
    os.environ["RAYCRAFT_HOME"] = str(tmp_path_factory.mktemp("raycraft-home"))  # the signing key's folder


@pytest.fixture(scope="session")
def ray_session():
    """Start Ray once per test session, in local mode (never a cluster left on the machine)."""
    import ray

    from raycraft.cluster import init_ray

    init_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def kill_when(driver: subprocess.Popen, ready: Callable[[], Any], timeout: float = 400) -> Any:
    """Poll `ready()` every 0.5 s while `driver` (started with `start_new_session`, output piped) runs; once it
    returns something, SIGKILL the driver and return that. The driver's session (the Ray daemons it started)
    is SIGKILLed by its process group, the driver's own PID, whatever happens."""
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and driver.poll() is None:
            if found := ready():
                os.kill(driver.pid, signal.SIGKILL)
                driver.wait(timeout=30)
                return found
            time.sleep(0.5)
        alive = driver.poll() is None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
    raise AssertionError("not ready before the deadline" if alive else driver.communicate()[0][-3000:])


def end_process_tree(pid: int) -> None:
    """End `pid` and every process below it: `mlflow server` forks uvicorn workers (and a job runner, with
    consumers of its own) that outlive a SIGTERM to the server itself."""
    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
        for proc in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.terminate()
        for proc in psutil.wait_procs(tree, timeout=15)[1]:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """A remote MLflow tracking server on 127.0.0.1 (its own SQLite backend, artifacts served by it from its
    own folder): the URI of a store that is not a local file."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    with (folder / "server.log").open("w") as log:
        server = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
             "--artifacts-destination", str(folder / "artifacts")],
            cwd=folder, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while not _answers(f"http://127.0.0.1:{port}/health"):
            assert server.poll() is None and time.time() < deadline, (folder / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        end_process_tree(server.pid)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(params=["sqlite", "server"])
def store_uri(request, mlflow_uri) -> str:
    """Each kind of MLflow store in turn: the SQLite file, then a remote tracking server."""
    return mlflow_uri if request.param == "sqlite" else request.getfixturevalue("mlflow_server")


@pytest.fixture
def storage(tmp_path) -> str:
    return str(tmp_path / "ray_results")


@dataclass
class S3Server:
    """moto's S3 API on 127.0.0.1, with IAM checks on: only `env`'s credentials are let in."""

    endpoint: str
    env: dict[str, str]  # AWS_ENDPOINT_URL, AWS_DEFAULT_REGION and the one access key that may use the store

    def bucket(self, name: str) -> str:
        """A new bucket: its `s3://` URI."""
        import boto3  # deferred: only the storage tests talk to the store

        boto3.client("s3", endpoint_url=self.endpoint, region_name=self.env["AWS_DEFAULT_REGION"],
                     aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """An S3-compatible store on loopback (moto's standalone server, stopped by its PID), and the session's AWS_*
    environment pointing at it, restored afterwards. Its IAM checks are on, so wrong credentials are refused as a
    real store refuses them: an IAM user with an S3 policy holds the only key that works."""
    folder = tmp_path_factory.mktemp("s3-server")
    endpoint = f"http://127.0.0.1:{free_port()}"
    with (folder / "server.log").open("w") as log:
        server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p",
                                   endpoint.rsplit(":", 1)[1]], cwd=folder, stdout=log, stderr=subprocess.STDOUT)
    saved = {k: os.environ.get(k) for k in S3_ENV}
    try:
        deadline = time.time() + 60
        while not _answers(f"{endpoint}/moto-api/data.json"):
            assert server.poll() is None and time.time() < deadline, (folder / "server.log").read_text()[-3000:]
            time.sleep(0.2)
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1", **_s3_user(endpoint)}
        for key in S3_ENV:
            os.environ.pop(key, None)
        os.environ.update(env)
        yield S3Server(endpoint, env)
    finally:
        for key in S3_ENV:
            os.environ.pop(key, None)
        os.environ.update({k: v for k, v in saved.items() if v is not None})
        end_process_tree(server.pid)


S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
          "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "MLFLOW_S3_ENDPOINT_URL")


def _s3_user(endpoint: str) -> dict[str, str]:
    """Create an IAM user that may do anything in S3, then turn moto's IAM checks on: that user's key."""
    import boto3  # deferred: only the storage tests talk to the store

    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                       aws_secret_access_key="setup")
    iam.create_user(UserName="raycraft")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="raycraft", PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="raycraft")["AccessKey"]
    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                     headers={"Content-Type": "text/plain"})  # 0 requests more without checks
    urllib.request.urlopen(request, timeout=10).close()
    return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
