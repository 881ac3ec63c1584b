"""`platform/` maps to `raycraft`; the standard library's `platform` must win everywhere."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import sysconfig
from pathlib import Path

from conftest import REPO

STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()


def test_no_init_in_platform_dir():
    assert not (REPO / "platform" / "__init__.py").exists()


def test_import_platform_from_repo_root_is_stdlib():
    code = "import platform, raycraft.cli; print(platform.__file__); print(platform.system())"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    path, system = out.stdout.split()
    assert Path(path).resolve().parent == STDLIB
    assert system == platform.system()


def test_raycraft_maps_to_platform_dir():
    import raycraft.registry

    assert Path(raycraft.registry.__file__).resolve().parent == REPO / "platform"


PROBE = """
import json, sys, ray
ray.init(address=sys.argv[1], _node_ip_address="127.0.0.1", runtime_env={"working_dir": sys.argv[2], "excludes": [
    ".venv", ".git", "mlflow.db", "mlartifacts", "ray_results", "*.egg-info", "__pycache__"]})

@ray.remote
def probe():
    import os, platform
    import raycraft.registry
    return [platform.__file__, platform.machine(), os.getcwd()]

print(json.dumps(ray.get(probe.remote())))
"""


def test_import_platform_in_ray_worker_with_repo_working_dir(ray_session, tmp_path):
    """A job whose working_dir is the repo (as `raycraft submit` sends it) still gets the stdlib module."""
    import json

    address = ray_session.get_runtime_context().gcs_address
    # raycraft's local Ray listens on loopback only: a second driver joins it as a process on that node
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    out = subprocess.run([sys.executable, "-c", PROBE, address, str(REPO)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=180, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    path, machine, cwd = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(path).resolve().parent == STDLIB
    assert machine
    assert (Path(cwd) / "platform").is_dir()  # the task really ran inside the uploaded copy of the repo
