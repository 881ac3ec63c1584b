"""Local mode (no --address) listens on loopback only and keeps the Ray token it writes private."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

RAYCRAFT = Path(sys.executable).with_name("raycraft")
CHILD = """
import os, sys
import ray
from raycraft.cluster import init_ray
init_ray()
print(os.getpid(), flush=True)
sys.stdin.readline()
ray.shutdown()
"""
# What a local Ray starts that always listens: GCS, raylet, dashboard, dashboard agent (gRPC, metrics export,
# HTTP) and runtime-env agent. The autoscaler monitor's and the dashboard's metrics ports are fixed (44217,
# 44227): with another Ray on the machine holding them they stay closed, so they are checked, not awaited.
SERVERS = ("gcs_server", "raylet", "dashboard/dashboard.py", "ray::DashboardAgent", "ray::RuntimeEnvAgent")
# The one socket beyond loopback, and torch's rather than Ray's: rank 0 of a Ray Train run hosts
# torch.distributed's rendezvous store (TCPStore), which torch binds to every interface with no option to
# choose one. At most one per run.
TORCH_STORE_PROCESS = "ray::RayTrainWorker"


def listeners(root: psutil.Process) -> tuple[set[tuple[str, int, str]], set[psutil.Process]]:
    """(address, port, command line) of every listening TCP socket of `root` and its descendants; those processes."""
    procs = {root, *root.children(recursive=True)}
    found = set()
    for proc in procs:
        with contextlib.suppress(psutil.Error):  # it ended meanwhile
            name = " ".join(proc.cmdline()).strip()
            found |= {(c.laddr.ip, c.laddr.port, name) for c in proc.net_connections(kind="tcp")
                      if c.status == psutil.CONN_LISTEN}
    return found, procs


def serves_all(found) -> bool:
    return all(any(server in name for *_, name in found) for server in SERVERS)


def beyond_loopback(found) -> list[tuple[str, int, str]]:
    return sorted(s for s in found if not ipaddress.ip_address(s[0].removeprefix("::ffff:")).is_loopback)


def local_env(home: Path) -> dict[str, str]:
    """A fresh HOME (no token yet), no cluster address, and Ray's default authentication (token)."""
    drop = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "MLFLOW_TRACKING_URI")
    home.mkdir()
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "HOME": str(home)}


def end(procs: set[psutil.Process]) -> None:
    """Kill those of `procs` (all started by the test) still running."""
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            if proc.is_running():
                proc.kill()


def test_local_ray_listens_on_loopback_only_and_its_token_is_private(tmp_path):
    home = tmp_path / "home"
    child = subprocess.Popen([sys.executable, "-c", CHILD], cwd=tmp_path, env=local_env(home), umask=0o022,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    root = psutil.Process(child.pid)
    started = {root}
    try:
        assert child.stdout.readline().strip() == str(child.pid)
        found, deadline = set(), time.time() + 60
        while not serves_all(found) and time.time() < deadline:
            more, procs = listeners(root)
            found, started = found | more, started | procs
            time.sleep(0.5)
        time.sleep(2)  # the metrics servers start last
        more, procs = listeners(root)
        found, started = found | more, started | procs
        assert serves_all(found), sorted(found)
        assert beyond_loopback(found) == []

        token = home / ".ray" / "auth_token"  # a local ray.init turns token authentication on and writes it
        assert token.stat().st_uid == os.getuid()
        assert stat.S_IMODE(token.stat().st_mode) == 0o600
    finally:
        child.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=60)
        end(started)


@pytest.mark.slow
def test_cli_train_in_local_mode_listens_on_loopback_only(tmp_path):
    env = local_env(tmp_path / "home")
    with open(tmp_path / "out.txt", "w") as out:
        cli = subprocess.Popen([str(RAYCRAFT), "train", "lenet5", "--dataset", "digits", "--epochs", "1"],
                               cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    root, started, found = psutil.Process(cli.pid), set(), set()
    try:
        deadline = time.time() + 600
        while cli.poll() is None and time.time() < deadline:
            with contextlib.suppress(psutil.Error):
                more, procs = listeners(root)
                found |= more
                started |= procs
            time.sleep(0.2)
        assert cli.poll() == 0, (tmp_path / "out.txt").read_text()[-4000:]
    finally:
        end(started)
    assert "final: " in (tmp_path / "out.txt").read_text()
    assert any(TORCH_STORE_PROCESS in name for *_, name in found)  # sampled while Ray Train ran
    exposed = beyond_loopback(found)
    assert len({port for _, port, _ in exposed}) <= 1, exposed
    # a process sampled as it starts or exits may show no name yet: the port must be the TCPStore's
    assert all(any(TORCH_STORE_PROCESS in name for _, p, name in exposed if p == port) for _, port, _ in exposed), \
        exposed
