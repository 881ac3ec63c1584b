"""`raycraft submit` / `jobs` input checks that need no cluster: the command, the address, the tracking store,
the packed working directory. (The real two-node run is in test_cluster_e2e.py.)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from conftest import REPO
from raycraft.cli import command_table
from raycraft.cluster import (
    EXCLUDES,
    check_reachable,
    check_tracking_uri,
    dashboard_address,
    package_project,
    split_command,
    with_option,
)
from raycraft.errors import UserError

COMMANDS = list(command_table())


def test_command_must_be_a_raycraft_command():
    assert split_command(["raycraft", "train", "lenet5"], COMMANDS) == ["train", "lenet5"]
    with pytest.raises(UserError, match="give the raycraft command"):
        split_command([], COMMANDS)
    with pytest.raises(UserError, match="Did you mean 'train'"):
        split_command(["trian"], COMMANDS)
    with pytest.raises(UserError, match="'submit' is not valid"):
        split_command(["submit", "--", "train"], COMMANDS)


def test_tracking_option_is_replaced_not_duplicated():
    cmd = ["train", "m", "--tracking-uri", "sqlite:///x.db", "--epochs", "1"]
    assert with_option(cmd, "--tracking-uri", "http://h:5000") == ["train", "m", "--epochs", "1",
                                                                   "--tracking-uri", "http://h:5000"]
    assert with_option(["train", "--tracking-uri=a"], "--tracking-uri", "b") == ["train", "--tracking-uri", "b"]


def test_dashboard_address(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a GCS address is not the Jobs API
    assert dashboard_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.1:8265/")
    assert dashboard_address(None) == "http://10.0.0.1:8265"
    assert dashboard_address("head:8265") == "http://head:8265"
    with pytest.raises(UserError, match="http"):
        dashboard_address("ray://head:10001")


def test_unreachable_address_fails_within_seconds():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(UserError, match="cannot reach the Ray cluster"):
        check_reachable(f"http://127.0.0.1:{port}", 8265)
    # a black-holed address (TEST-NET-1, never routed) waits for the timeout, not for minutes
    with pytest.raises(UserError, match="cannot reach"):
        check_reachable("192.0.2.123:6379", 6379, timeout=1.0)
    assert time.monotonic() - start < 10


def test_local_tracking_store_refused_for_multi_node():
    db = "sqlite:////home/me/mlflow.db"
    check_tracking_uri(db, "http://127.0.0.1:8265", nodes=1)  # one local node shares this disk
    with pytest.raises(UserError, match="tracking server") as err:
        check_tracking_uri(db, "http://127.0.0.1:8265", nodes=2)
    assert "mlflow server" in str(err.value) and "--tracking-uri http://" in str(err.value)
    with pytest.raises(UserError, match="tracking server"):
        check_tracking_uri("/home/me/mlruns", "http://10.1.2.3:8265", nodes=1)
    with pytest.raises(UserError, match="loopback"):
        check_tracking_uri("http://127.0.0.1:5000", "http://10.1.2.3:8265", nodes=3)
    check_tracking_uri("http://mlflow.internal:5000", "http://10.1.2.3:8265", nodes=3)


def test_package_leaves_out_environments_stores_and_caches(tmp_path):
    project = tmp_path / "proj"
    for name in ["train.yaml", "data/small.csv", ".venv/lib/x.py", "mlflow.db", "mlruns/0/meta.yaml",
                 "ray_results/r/epoch_0000/state.pt", "pkg/__pycache__/m.pyc", "checkpoints/best.pt", ".git/HEAD"]:
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text("x")
    out = tmp_path / "out"
    out.mkdir()
    names = set(zipfile.ZipFile(package_project(project, out)).namelist())
    assert {"train.yaml", "data/small.csv"} <= names
    assert not {n for n in names if n.split("/")[0] in {".venv", "mlruns", "ray_results", "checkpoints", ".git"}}
    assert "mlflow.db" not in names and not [n for n in names if "__pycache__" in n]
    assert "mlflow.db" in EXCLUDES


def test_package_larger_than_the_jobs_api_takes(tmp_path, monkeypatch):
    project = tmp_path / "proj"
    project.mkdir()
    (project / "big.bin").write_bytes(os.urandom(2 * 2**20))
    monkeypatch.setenv("RAY_max_grpc_message_size", str(2**20))
    with pytest.raises(UserError, match=r"big\.bin .*\.rayignore"):
        package_project(project, tmp_path)
    with pytest.raises(UserError, match="not a folder"):
        package_project(project / "big.bin", tmp_path)


def test_cli_submit_without_command_exits_2():
    out = subprocess.run([str(Path(sys.executable).parent / "raycraft"), "submit"], capture_output=True, text=True,
                         cwd=REPO, timeout=300)
    assert out.returncode == 2 and "give the raycraft command" in out.stderr and "Traceback" not in out.stderr
