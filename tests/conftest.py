"""Shared fixtures: one private local Ray for the session, a real MLflow SQLite store, small real data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

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


@pytest.fixture
def storage(tmp_path) -> str:
    return str(tmp_path / "ray_results")
