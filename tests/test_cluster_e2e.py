"""A real two-node Ray cluster on loopback, an MLflow tracking server, and `raycraft submit` against them.

The commands are those of docs/cluster.md ("A two-node cluster on one machine"), with free ports in
place of the defaults and `--block` so each node is a child process of the test. Token authentication
is on (RAY_AUTH_MODE=token, the token in ~/.ray/auth_token, with HOME a folder of the test's own).
Every process the test started is found (the tree under each Popen, plus any process carrying this
test's marker in its environment) and ended by PID; `ray stop` is never used.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
import pyarrow.fs as pafs
import pytest
import requests
from PIL import Image

from conftest import REPO
from raycraft import storage

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
MARK = "RAYCRAFT_TEST_CLUSTER"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Exited(AssertionError):
    """A process the test started ended while it should be coming up."""


def check_alive(proc: subprocess.Popen, log: Path) -> None:
    if proc.poll() is not None:
        raise Exited(f"exited with {proc.returncode}:\n{log.read_text()[-3000:]}")


def retried(start):
    """`ray start` gives its raylet a fixed 30 s to register with the GCS, which an overloaded machine can
    miss: one more try, with fresh ports."""
    try:
        return start(0)
    except Exited:
        return start(1)


def wait_port(port: int, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        check_alive(proc, log)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"port {port} never opened:\n{log.read_text()[-3000:]}")


class Processes:
    """Starts commands in sessions of their own, each carrying a marker; ends exactly those processes."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs, self.popens = env, logs, []
        self.marker = env[MARK]

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.popens.append(proc)
        return proc

    def ours(self) -> list[psutil.Process]:
        found: dict[int, psutil.Process] = {}
        for p in self.popens:
            try:
                root = psutil.Process(p.pid)
                found.update({c.pid: c for c in [root, *root.children(recursive=True)]})
            except psutil.NoSuchProcess:
                continue
        for proc in psutil.process_iter():
            try:
                if proc.environ().get(MARK) == self.marker:
                    found[proc.pid] = proc
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return list(found.values())

    def stop_all(self) -> list[str]:
        """SIGTERM, then SIGKILL after a grace period; returns what is still alive (should be nothing)."""
        for _ in range(3):  # a dying parent may still spawn: look again
            procs = self.ours()
            if not procs:
                break
            for p in procs:
                with_suppressed(p.send_signal, signal.SIGTERM)
            _, alive = psutil.wait_procs(procs, timeout=10)
            for p in alive:
                with_suppressed(p.kill)
            psutil.wait_procs(alive, timeout=10)
        for p in self.popens:
            p.wait(timeout=10)
        return [f"{p.pid} {p.name()}" for p in self.ours() if p.status() != psutil.STATUS_ZOMBIE]


def with_suppressed(fn, *args) -> None:
    try:
        fn(*args)
    except psutil.NoSuchProcess:
        pass


def listening(procs: list[psutil.Process]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in procs:
        try:
            socks = [c for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN]
            out.setdefault(p.name(), []).extend(f"{c.laddr.ip}:{c.laddr.port}" for c in socks)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


@pytest.fixture(scope="module")
def cluster(s3_server):
    """Head + second node + MLflow server, all on 127.0.0.1, token auth on, with the S3-compatible store's
    AWS_* environment; torn down by PID. Each node declares 2 CPUs (the head 3): a run's 2 workers x 2 CPUs
    pack one to a node, leaving the head a CPU for Ray Data's reading tasks."""
    root = Path(tempfile.mkdtemp(prefix="rc-"))  # short: Ray's socket paths live under --temp-dir
    home, logs = root / "home", root / "logs"
    home.mkdir()
    logs.mkdir()
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token", MARK: uuid.uuid4().hex,
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_AUTH_TOKEN",
                "RAY_AUTH_TOKEN_PATH"):
        env.pop(key, None)
    procs = Processes(env, logs)
    mlflow_port = free_port()
    ray = [str(BIN / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1", "--disable-usage-stats",
           "--dashboard-agent-listen-port"]
    try:
        subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True,
                       capture_output=True, timeout=120)
        server = procs.start("mlflow", [str(BIN / "mlflow"), "server", "--backend-store-uri",
                                        f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
                                        str(root / "mlartifacts"), "--host", "127.0.0.1", "--port",
                                        str(mlflow_port), "--workers", "1"])

        def start_head(attempt: int) -> tuple[int, int]:
            gcs, dash = free_port(), free_port()
            head = procs.start(f"head{attempt}", [
                *ray, str(free_port()), "--num-cpus", "3", "--head", "--port", str(gcs), "--dashboard-host",
                "127.0.0.1", "--dashboard-port", str(dash), "--ray-client-server-port", str(free_port()),
                "--temp-dir", str(root / f"ray-head{attempt}")])
            wait_port(dash, head, 180, logs / f"head{attempt}.log")
            return gcs, dash

        gcs, dash = retried(start_head)
        dashboard = f"http://127.0.0.1:{dash}"
        token = (home / ".ray" / "auth_token").read_text().strip()
        headers = {"Authorization": f"Bearer {token}"}

        def start_worker(attempt: int) -> None:
            worker = procs.start(f"worker{attempt}", [*ray, str(free_port()), "--num-cpus", "2",
                                                      "--address", f"127.0.0.1:{gcs}",
                                                      "--temp-dir", str(root / f"ray-worker{attempt}")])
            deadline, answer = time.time() + 240, ""
            while time.time() < deadline:
                check_alive(worker, logs / f"worker{attempt}.log")
                try:  # on a loaded machine the dashboard may still be (re)starting its modules
                    r = requests.get(f"{dashboard}/api/v0/nodes", headers=headers, timeout=10)
                    answer = r.text[:500]
                    if r.ok and sum(n["state"] == "ALIVE" for n in r.json()["data"]["result"]["result"]) == 2:
                        return
                except requests.ConnectionError as exc:
                    answer = str(exc)
                time.sleep(1)
            tails = {p.name: p.read_text()[-1500:] for p in [*logs.glob("head*.log"),
                                                              *root.glob("ray-head*/session_*/logs/dashboard.*")]}
            raise AssertionError(f"the second node never joined: {answer}\n{tails}")

        retried(start_worker)
        wait_port(mlflow_port, server, 180, logs / "mlflow.log")
        yield {"dashboard": dashboard, "mlflow": f"http://127.0.0.1:{mlflow_port}", "env": env,
               "headers": headers, "procs": procs, "s3": s3_server}
    finally:
        left = procs.stop_all()
        assert not left, f"processes the test started are still running: {left}"
        shutil.rmtree(root, ignore_errors=True)


def raycraft(cluster, *args: str, env: dict[str, str] | None = None, timeout: float = 600):
    return subprocess.run([str(BIN / "raycraft"), *args], env=env or cluster["env"], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def images_in_s3(s3, tmp_path) -> str:
    """A two-class image folder that only the S3-compatible store holds: its s3:// URI."""
    rng = np.random.default_rng(0)
    for label, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        (tmp_path / "images" / f"c{label}").mkdir(parents=True)
        for i in range(300):
            pixels = rng.integers(0, 60, (16, 16, 3)) + np.array(colour)
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(tmp_path / "images" / f"c{label}" / f"{i}.png")
    bucket = s3.bucket("cluster-data")
    fs, path = storage.filesystem(f"{bucket}/images")
    pafs.copy_files(str(tmp_path / "images"), path, destination_filesystem=fs)
    shutil.rmtree(tmp_path / "images")
    return f"{bucket}/images"


def kill_a_worker_after_a_step_checkpoint(cluster, bucket: str, job: subprocess.Popen) -> int:
    """Once Ray Train has registered the run's first step checkpoint (its checkpoint manager's snapshot in the
    bucket names one: an uploaded folder it has not registered yet would not be restored), SIGKILL one of its
    Ray Train workers: its pid."""
    deadline = time.time() + 400
    while not any("_batch_" in read_text(f) for f in storage.list_files(bucket) if f.endswith("snapshot.json")):
        assert job.poll() is None and time.time() < deadline, (storage.list_files(bucket),
                                                                job.communicate()[0][-4000:])
        time.sleep(0.5)
    r = requests.get(f"{cluster['dashboard']}/api/v0/actors", headers=cluster["headers"], timeout=30,
                     params={"filter_keys": "class_name", "filter_predicates": "=", "filter_values": "RayTrainWorker",
                             "detail": "1", "limit": "100"})
    victim = max(a["pid"] for a in r.json()["data"]["result"]["result"] if a.get("state") == "ALIVE")
    os.kill(victim, signal.SIGKILL)
    return victim


def read_text(uri: str) -> str:
    fs, path = storage.filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


@pytest.mark.heavy  # about 200 s alone, 400 s beside other tests: its parts run by default (test_storage,
# test_train_e2e's killed worker, test_step_checkpoints), the whole on demand with `-m heavy`
def test_two_node_training_from_s3_survives_a_killed_worker(cluster, tmp_path):
    """Data and checkpoints only in the S3-compatible store; a worker killed mid-epoch; the run resumes from
    its newest step checkpoint with MLflow's history exact, tracked in the MLflow server."""
    data, ckpt = images_in_s3(cluster["s3"], tmp_path), cluster["s3"].bucket("cluster-ckpt")
    address = ["--address", cluster["dashboard"]]
    job = subprocess.Popen([str(BIN / "raycraft"), "submit", *address, "--", "train", "lenet5", "--dataset",
                            "image_folder", "--data-dir", data, "--workers", "2", "--epochs", "2", "--batch-size", "8",
                            "--set", "cpus_per_worker=2", "--set", "data.image_size=16", "--set",
                            f"storage_path={ckpt}/runs", "--set", "checkpoint_every_steps=4", "--set",
                            "log_every_steps=4", "--experiment", "two-node", "--tracking-uri", cluster["mlflow"]],
                           env=cluster["env"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    kill_a_worker_after_a_step_checkpoint(cluster, ckpt, job)
    output = job.communicate(timeout=900)[0]
    assert job.returncode == 0, output[-6000:]
    job_id = output.split("submitted job ", 1)[1].split()[0]
    run_id = output.split("run id:", 1)[1].split()[0]
    assert "resuming at batch" in output, output[-4000:]

    api = f"{cluster['mlflow']}/api/2.0/mlflow"
    run = requests.get(f"{api}/runs/get", params={"run_id": run_id}, timeout=30).json()["run"]
    assert run["info"]["status"] == "FINISHED"
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert metrics["test_accuracy"] > 0.8 and "val_loss" in metrics
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["workers"] == "2" and params["data.data_dir"] == data
    history = requests.get(f"{api}/metrics/get-history", params={"run_id": run_id, "metric_key": "global_step"},
                           timeout=30).json()["metrics"]
    steps = sorted(int(m["step"]) for m in history)
    assert steps == list(range(4, steps[-1] + 1, 4)) and len(steps) >= 8  # each logged step once, none lost
    epochs = requests.get(f"{api}/metrics/get-history", params={"run_id": run_id, "metric_key": "epoch"},
                          timeout=30).json()["metrics"]
    assert sorted(int(m["step"]) for m in epochs) == [0, 1]
    files = requests.get(f"{api}/artifacts/list", params={"run_id": run_id}, timeout=30).json()["files"]
    assert {"config.yaml", "checkpoint", "plots"} <= {f["path"] for f in files}
    assert any("/epoch_0001/" in f for f in storage.list_files(f"{ckpt}/runs"))

    # the two Ray Train workers ran on two different nodes
    r = requests.get(f"{cluster['dashboard']}/api/v0/actors", headers=cluster["headers"], timeout=30,
                     params={"filter_keys": "class_name", "filter_predicates": "=",
                             "filter_values": "RayTrainWorker", "detail": "1", "limit": "100"})
    nodes = {a["node_id"] for a in r.json()["data"]["result"]["result"]}
    assert len(nodes) == 2, r.text[:1000]

    # the job is listed, its logs are kept
    listed = raycraft(cluster, "jobs", "list", *address)
    assert job_id in listed.stdout and "SUCCEEDED" in listed.stdout, listed.stdout + listed.stderr
    logs = raycraft(cluster, "jobs", "logs", job_id, *address)
    assert logs.returncode == 0 and run_id in logs.stdout

    # nothing of ours listens for HTTP beyond loopback: the dashboard and the tracking server
    ports = {int(cluster["dashboard"].rsplit(":", 1)[1]), int(cluster["mlflow"].rsplit(":", 1)[1])}
    http = [addr for addrs in listening(cluster["procs"].ours()).values() for addr in addrs
            if int(addr.rsplit(":", 1)[1]) in ports]
    assert http and all(a.rsplit(":", 1)[0] == "127.0.0.1" for a in http), http


def test_submit_no_wait_then_stop(cluster):
    address = ["--address", cluster["dashboard"]]
    out = raycraft(cluster, "submit", *address, "--no-wait", "--", "train", "lenet5", "--dataset", "digits",
                   "--epochs", "50", "--tracking-uri", cluster["mlflow"])
    assert out.returncode == 0, out.stdout + out.stderr
    job_id = out.stdout.split("submitted job ", 1)[1].split()[0]
    stop = raycraft(cluster, "jobs", "stop", job_id, *address)
    assert stop.returncode == 0 and "stop requested" in stop.stdout, stop.stdout + stop.stderr
    deadline = time.time() + 120
    while time.time() < deadline:
        listed = raycraft(cluster, "jobs", "list", *address).stdout
        row = next(line for line in listed.splitlines() if job_id in line)
        if "STOPPED" in row:
            break
        time.sleep(2)
    assert "STOPPED" in row, listed


def test_submit_refuses_bad_input(cluster, tmp_path):
    address = ["--address", cluster["dashboard"]]
    train = ["--", "train", "lenet5", "--dataset", "digits"]

    # a laptop's SQLite file cannot serve a two-node cluster: the message names the fix
    out = raycraft(cluster, "submit", *address, *train, "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}")
    assert out.returncode == 2 and "tracking server" in out.stderr and "mlflow server" in out.stderr, out.stderr

    # no token, a wrong token
    no_token = {**cluster["env"], "HOME": str(tmp_path)}
    out = raycraft(cluster, "submit", *address, *train, "--tracking-uri", cluster["mlflow"], env=no_token)
    assert out.returncode == 2 and "RAY_AUTH_MODE=token" in out.stderr, out.stderr
    wrong = {**cluster["env"], "RAY_AUTH_TOKEN": "0" * 32}
    out = raycraft(cluster, "jobs", "list", *address, env=wrong)
    assert out.returncode == 2 and "token" in out.stderr and "Traceback" not in out.stderr, out.stderr

    # a working directory larger than the Jobs API takes (the limit lowered to 1 MiB for the test)
    big = tmp_path / "project"
    big.mkdir()
    (big / "data.bin").write_bytes(os.urandom(2 * 2**20))
    small_limit = {**cluster["env"], "RAY_max_grpc_message_size": str(2**20)}
    out = raycraft(cluster, "submit", *address, "--working-dir", str(big), *train, "--tracking-uri",
                   cluster["mlflow"], env=small_limit)
    assert out.returncode == 2 and "data.bin" in out.stderr and ".rayignore" in out.stderr, out.stderr

    # an unknown job id
    out = raycraft(cluster, "jobs", "logs", "raycraft-no-such-job", *address)
    assert out.returncode == 2 and "no job" in out.stderr, out.stderr

