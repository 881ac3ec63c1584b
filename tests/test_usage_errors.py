"""Command-line usage errors through the installed `raycraft` executable: exit 2, one or two lines naming the
option, the bad value and the choices, never a traceback. Typer ships its own copy of click, so these go
through the real entry point rather than CliRunner; a core-only install's hints for missing extras, too."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import RAYCRAFT, assert_refused

RUN_ID = "0123456789abcdef"

CASES = {
    "train: unknown option": (["train", "lenet5", "--epoch", "2"], ["--epoch", "--epochs"]),
    "train: integer option given text": (["train", "lenet5", "--seed", "abc"], ["--seed", "'abc'", "integer"]),
    "train: --epochs=text": (["train", "lenet5", "--epochs=abc"], ["--epochs", "'abc'"]),
    "unknown command": (["run"], ["No such command", "'run'"]),
    "runs compare: one run id": (["runs", "compare", RUN_ID], ["RUN_ID", "two or more run ids"]),
    "runs: unknown subcommand": (["runs", "comapre"], ["No such command", "'comapre'"]),
    "rl: missing algorithm": (["rl"], ["Missing argument", "algo"]),
    "rl: float option given text": (["rl", "dqn", "--stop-reward", "high"], ["--stop-reward", "'high'"]),
    "rl: unknown option": (["rl", "dqn", "--timestep", "10"], ["--timestep", "--timesteps"]),
    "rl-eval: integer option given text": (["rl-eval", RUN_ID, "--episodes", "ten"], ["--episodes", "'ten'"]),
    "tune: integer option given text": (["tune", "x.yaml", "--samples", "many"], ["--samples", "'many'"]),
    "scaling: missing file": (["scaling"], ["Missing argument", "file"]),
    "scaling: unknown option": (["scaling", "x.yaml", "--resum", "x"], ["--resum"]),
    "sample: integer option given text": (["sample", RUN_ID, "--n", "lots"], ["--n", "'lots'"]),
    "sample: missing value": (["sample", RUN_ID, "--out"], ["--out", "requires an argument"]),
    "generate: float option given text": (["generate", RUN_ID, "--temperature", "warm"],
                                          ["--temperature", "'warm'"]),
    "generate: missing run id": (["generate"], ["Missing argument", "run_id"]),
    "submit: missing value": (["submit", "--working-dir"], ["--working-dir", "requires an argument"]),
    "jobs: unknown subcommand": (["jobs", "lst"], ["No such command", "'lst'"]),
    "jobs logs: missing job id": (["jobs", "logs"], ["Missing argument", "job_id"]),
    "models: unknown option": (["models", "--detail", "mlp"], ["--detail", "--details"]),
}


def run(args: list[str], cwd: Path, exe: Path = RAYCRAFT) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    return subprocess.run([str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("usage")
    with ThreadPoolExecutor(2) as pool:
        outs = dict(zip(CASES, pool.map(lambda a: run(a, cwd), [c[0] for c in CASES.values()]), strict=True))
    return outs, cwd


@pytest.mark.parametrize("case", list(CASES))
def test_usage_error_is_two_lines_and_exit_2(case, results):
    outs, cwd = results
    out = outs[case]
    assert_refused(out, CASES[case][1])
    assert len((out.stdout + out.stderr).strip().splitlines()) <= 2, out.stdout + out.stderr
    assert not (cwd / "mlflow.db").exists(), "a usage error created an MLflow store"


def test_entry_point_imports_only_what_every_command_needs(tmp_path):
    """`raycraft models` through the entry point: none of one command's heavy modules is imported."""
    probe = ("import atexit, sys\n"
             "atexit.register(lambda: print('MODULES', ' '.join(sorted(sys.modules))))\n"
             "sys.argv = ['raycraft', 'models']\n"
             "from raycraft.cli import main\n"
             "main()\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    loaded = set(out.stdout.split("MODULES", 1)[1].split())
    assert "lenet5" in out.stdout  # the command ran
    for heavy in ("psutil", "ray.rllib", "gymnasium", "optuna", "hyperopt", "mlflow"):
        assert heavy not in loaded, f"{heavy} is imported for every command"


CORE_VENV = os.environ.get("RAYCRAFT_CORE_VENV")
core_only = pytest.mark.skipif(not CORE_VENV, reason="needs RAYCRAFT_CORE_VENV: a virtualenv with the core "
                                                     "install only (.ci/run makes one with the README's quick start)")

EXTRA_CASES = {
    "rl dqn": (["rl", "dqn", "--env", "CartPole-v1"], "rl", "gymnasium"),
    "rl-eval": (["rl-eval", RUN_ID], "rl", "gymnasium"),
    "a graph dataset": (["train", "gcn", "--dataset", "karate"], "ssm", "torch-geometric"),
    "a time-series dataset": (["train", "kalman", "--dataset", "nile"], "ssm", "statsmodels"),
}


@core_only
@pytest.mark.parametrize("case", list(EXTRA_CASES))
def test_core_install_names_the_missing_extra(case, tmp_path):
    args, extra, package = EXTRA_CASES[case]
    out = run(args, tmp_path, Path(CORE_VENV, "bin", "raycraft"))
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert "Traceback" not in text
    assert f"pip install 'raycraft[{extra}]'" in text and package in text, text
    assert "Started a local Ray instance" not in text
    assert not (tmp_path / "mlflow.db").exists(), "the hint came after an MLflow store was made"


@core_only
def test_core_install_has_shakespeare(tmp_path):
    code = "from raycraft.data.text import shakespeare_plays; p = shakespeare_plays(); print(len(p), p['hamlet'][:40])"
    out = subprocess.run([str(Path(CORE_VENV, "bin", "python")), "-c", code], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    count, text = out.stdout.split(" ", 1)
    assert int(count) >= 30 and "Hamlet" in text, out.stdout
