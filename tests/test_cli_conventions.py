"""What a person sees in the terminal, through the installed `raycraft` executable: `--version`, shell
completion, `raycraft runs` and `runs compare` (tables and `--json`) on a real MLflow store, the config keys of
`models --details` with their choices, whole dataset descriptions, and numbers rounded one way."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest

from conftest import RAYCRAFT, assert_refused, run_raycraft
from raycraft import noise, tracking
from raycraft.console import format_metrics, format_number
from raycraft.models.attention import AttentionKind
from raycraft.registry import datasets

WIDE = {"COLUMNS": "400"}  # one line per table row, so a row's cells can be read off it


def wide(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`raycraft ARGS` on a wide terminal, on the store in `cwd` (as conftest's `run_raycraft`: an earlier test
    in this process may have left MLflow's MLFLOW_TRACKING_URI pointing at its own store)."""
    env = {**os.environ, **WIDE, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    return subprocess.run([str(RAYCRAFT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_version_names_raycraft_and_its_libraries(tmp_path):
    out = subprocess.run([str(RAYCRAFT), "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert line.startswith(f"raycraft {importlib.metadata.version('raycraft')} (Python "), line
    for library in ("ray", "torch", "mlflow"):
        assert f"{library} {importlib.metadata.version(library)}" in line, line


def bash(script: str, cwd: Path, home: Path) -> subprocess.CompletedProcess:
    """`script` run by bash (the shell typer detects) with raycraft on its PATH and `home` as HOME."""
    env = {**os.environ, "HOME": str(home), "PATH": f"{RAYCRAFT.parent}:{os.environ['PATH']}"}
    return subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_shell_completion_installs_and_completes_commands(tmp_path):
    """`--install-completion` writes bash's script and sources it from ~/.bashrc; that script, sourced, completes
    `raycraft ru` to `runs` and `raycraft runs ` to its subcommand, through the real executable."""
    home = tmp_path / "home"
    home.mkdir()
    installed = bash("raycraft --install-completion", tmp_path, home)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    script = home / ".bash_completions" / "raycraft.sh"
    assert f"source '{script}'" in (home / ".bashrc").read_text()
    shown = bash("raycraft --show-completion", tmp_path, home)
    assert shown.returncode == 0 and shown.stdout.strip() == script.read_text().strip(), shown.stderr

    def complete(words: str) -> list[str]:
        cword = len(words.split()) - (0 if words.endswith(" ") else 1)
        out = bash(f"source {shlex.quote(str(script))}; COMP_WORDS=({words}''); COMP_CWORD={cword}; "
                   "_raycraft_completion raycraft; printf '%s\\n' \"${COMPREPLY[@]}\"", tmp_path, home)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    assert complete("raycraft ru") == ["runs"]
    assert complete("raycraft runs ") == ["compare"]
    assert complete("raycraft runs compare --js") == ["--json"]


# --- raycraft runs ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A real MLflow store (`cwd/mlflow.db`) with two finished training runs that differ in `optim.lr` and
    `seed`, a failed one in another experiment, and a RUNNING run whose client has died."""
    cwd = tmp_path_factory.mktemp("runs")
    uri = tracking.resolve_tracking_uri(f"sqlite:///{cwd / 'mlflow.db'}")
    same = {"model": "lenet5", "dataset": "digits", "epochs": 3}
    ids = {}
    for name, params, metrics in (("slow", {"optim.lr": 0.001}, {"test_accuracy": 0.97531, "test_loss": 0.0812}),
                                  ("fast", {"optim.lr": 0.01, "seed": 7}, {"test_accuracy": 0.9, "test_loss": 0.3})):
        run = tracking.Run.start(uri, "raycraft", name, {**same, **params}, {}, "epochs: 3\n")
        run.log_epoch({tracking.EPOCH_KEY: 0, "val_loss": 0.5, "samples_per_s": 12345.6})
        run.log_metrics(metrics)
        run.end()
        ids[name] = run.run_id
    failed = tracking.Run.start(uri, "other", "failed", {"model": "mlp", "dataset": "digits"}, {}, "")
    failed.log_epoch({tracking.EPOCH_KEY: 0, "val_loss": 2.5})
    failed.end("FAILED", "diverged in epoch 1")
    ids["failed"] = failed.run_id
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = tracking.Run.start(uri, "raycraft", "orphan", same, {}, "")
    orphan.set_tags({tracking.CLIENT_TAG: f"{os.uname().nodename}:{dead.pid}:0.00", tracking.HEARTBEAT_TAG: "0"})
    ids["orphan"] = orphan.run_id
    return cwd, ids


def test_runs_json_lists_every_run_with_its_fields_and_reaps_the_dead(store):
    cwd, ids = store
    out = run_raycraft(["runs", "--json"], cwd)
    assert out.returncode == 0, out.stderr
    rows = {row["run_id"]: row for row in json.loads(out.stdout)}  # stdout holds the JSON and nothing else
    assert set(rows) == set(ids.values())
    slow = rows[ids["slow"]]
    assert {k: slow[k] for k in ("name", "experiment", "status", "model", "dataset", "parent_run_id")} == {
        "name": "slow", "experiment": "raycraft", "status": "FINISHED", "model": "lenet5", "dataset": "digits",
        "parent_run_id": None}
    assert slow["metrics"] == {"test_accuracy": 0.97531, "test_loss": 0.0812}  # key metrics only
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", slow["start"]) and slow["duration_s"] >= 0
    failed = rows[ids["failed"]]
    assert failed["metrics"] == {"val_loss": 2.5} and failed["note"] == "diverged in epoch 1"
    assert rows[ids["orphan"]]["status"] == "KILLED" and ids["orphan"] in out.stderr  # reaped, said on stderr

    only = json.loads(run_raycraft(["runs", "--json", "--experiment", "other", "--limit", "5"], cwd).stdout)
    assert [row["run_id"] for row in only] == [ids["failed"]]
    newest = json.loads(run_raycraft(["runs", "--json", "--limit", "1"], cwd).stdout)
    assert [row["run_id"] for row in newest] == [ids["orphan"]]


def test_runs_table_shows_status_model_metrics_and_duration(store):
    cwd, ids = store
    out = wide(["runs", "--tracking-uri", f"sqlite:///{cwd / 'mlflow.db'}"], cwd)
    assert out.returncode == 0, out.stderr
    header = next(line for line in out.stdout.splitlines() if line.strip().startswith("run id"))
    assert re.split(r"\s{2,}", header.strip()) == ["run id", "experiment", "status", "model", "data", "key metrics",
                                                   "started", "duration", "note"]
    row = next(line for line in out.stdout.splitlines() if ids["slow"] in line)
    cells = re.split(r"\s{2,}", row.strip())  # columns are set apart by spaces
    assert cells[1:5] == ["raycraft", "FINISHED", "lenet5", "digits"], cells
    assert cells[5] == "test_accuracy 0.9753", cells  # the first key metric's line of the cell
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", cells[6]) and re.fullmatch(r"\d+s", cells[7]), cells
    one = wide(["runs", "--experiment", "other"], cwd).stdout  # one experiment: no column for it
    assert "experiment" not in next(line for line in one.splitlines() if line.strip().startswith("run id"))


def test_runs_compare_shows_the_params_that_differ_and_final_metrics(store):
    cwd, ids = store
    out = wide(["runs", "compare", ids["slow"], ids["fast"], "--tracking-uri", f"sqlite:///{cwd / 'mlflow.db'}"],
               cwd)
    assert out.returncode == 0, out.stderr
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("│ ").split("│")]
                                               for line in out.stdout.splitlines() if line.startswith("│"))}
    assert rows["optim.lr"] == ["0.001", "0.01"] and rows["seed"] == ["-", "7"]
    assert "epochs" not in rows and "dataset" in rows  # epochs: the same in both; dataset: a summary row
    assert rows["test_accuracy"] == ["0.9753", "0.9"] and rows["samples_per_s"] == ["12,346", "12,346"]
    assert "2 of 5 params differ" in out.stdout

    as_json = run_raycraft(["runs", "compare", "--json", ids["slow"], ids["failed"]], cwd)
    data = json.loads(as_json.stdout)
    assert [r["run_id"] for r in data["runs"]] == [ids["slow"], ids["failed"]]
    assert data["params"] == {"epochs": ["3", None], "model": ["lenet5", "mlp"], "optim.lr": ["0.001", None]}
    assert data["metrics"]["val_loss"] == [0.5, 2.5] and data["metrics"]["test_loss"] == [0.0812, None]


def test_runs_compare_refuses_an_unknown_run_id_naming_it(store):
    cwd, ids = store
    assert_refused(run_raycraft(["runs", "compare", ids["slow"], "0123456789abcdef0123456789abcdef"], cwd),
                   ["RUN_ID", "'0123456789abcdef0123456789abcdef'"])
    assert_refused(run_raycraft(["runs", "--experiment", "nope"], cwd), ["--experiment", "'nope'", "raycraft"])


# --- the catalog and numbers --------------------------------------------------------------------------------


def test_models_details_lists_nested_keys_and_choices(tmp_path):
    out = wide(["models", "--details", "transformer"], tmp_path)
    assert out.returncode == 0, out.stderr
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("│ ").split("│")]
                                               for line in out.stdout.splitlines() if line.startswith("│"))}
    assert rows["moe.experts"] == ["0", "", "Experts per FFN (0: one dense FFN)."]
    assert rows["lora.rank"][0] == "0" and rows["lora.alpha"][0] == "16.0"
    assert rows["attention"][:2] == ["full", ", ".join(get_args(AttentionKind))]
    assert rows["causal"][0] == "true" and rows["norm_position"][:2] == ["pre", "pre, post"]
    assert "MoEConfig" not in out.stdout and "LoRAConfig" not in out.stdout
    kalman = wide(["models", "--details", "kalman"], tmp_path).stdout
    assert re.search(r"│ fit +│ \[\"Q\", \"R\"\] +│ A, C, Q, R +│", kalman), kalman


def test_datasets_show_whole_descriptions(tmp_path):
    out = wide(["datasets"], tmp_path)
    assert out.returncode == 0, out.stderr
    for spec in datasets().values():
        assert spec.description.endswith(".") and spec.description in out.stdout, spec.name
    assert "sum can; 1-WL-indistinguishable pairs (C_n vs two C_n/2) sit inside a class." in out.stdout


@pytest.mark.parametrize("value, shown", [
    (0.97531, "0.9753"), (12.3456, "12.35"), (0.00012345, "0.0001234"), (1.2345e-5, "1.234e-05"),
    (12345.6, "12,346"), (999.96, "1,000"), (3.0, "3"), (60000, "60,000"), (-0.5, "-0.5"), (float("nan"), "nan"),
])
def test_numbers_are_rounded_one_way(value, shown):
    assert format_number(value) == shown


def test_metrics_are_listed_by_name():
    assert format_metrics({"val_loss": 0.123456, "samples_per_s": 2345.6}) == "samples_per_s 2,346  val_loss 0.1235"


def test_the_run_page_is_on_the_tracking_server_or_the_printed_mlflow_ui(mlflow_server, mlflow_uri):
    """A run's page: on a tracking server, that server's; for a local store, the address the printed `mlflow ui`
    command serves (its --host and --port)."""
    for uri in (mlflow_server, mlflow_uri):
        run = tracking.Run.start(uri, "pages", "paged", {}, {}, "")
        run.end()
        experiment = tracking.get_run(uri, run.run_id).info.experiment_id
        page = f"#/experiments/{experiment}/runs/{run.run_id}?workflowType=machine_learning"
        shown = tracking.ui_command(uri, run.run_id)
        if uri == mlflow_server:
            assert shown == f"open {mlflow_server}/{page}"
        else:
            assert shown == (f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000, "
                             f"then open http://127.0.0.1:5000/{page}")


# --- third-party noise --------------------------------------------------------------------------------------

NOISE_PROBE = """
import logging, sys, warnings
from raycraft import noise
logging.basicConfig(stream=sys.stdout, format="%(name)s|%(message)s", level=logging.INFO)
if sys.argv[1] == "quiet":
    noise.quiet()
for name, _ in noise.LOGGED:
    logging.getLogger(name).warning("raycraft's own line on this logger")
logging.getLogger("ray._common.deprecation").warning("DeprecationWarning: `ray.foo` has been deprecated.")
logging.getLogger("ray.rllib.algorithms.algorithm_config").warning("You are running DQN on the new API stack! ...")
logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
with warnings.catch_warnings(record=True) as caught:
    exec(compile("import warnings; warnings.warn('\\x1b[33mWARN: Overriding environment "
                 "rllib-single-agent-env-v0 already in registry.', UserWarning)", "registration.py", "exec"),
         {"__name__": "gymnasium.envs.registration"})
    exec(compile("import warnings; warnings.warn('WARN: Overriding environment CartPole-v1 already', UserWarning)",
                 "registration.py", "exec"), {"__name__": "gymnasium.envs.registration"})
print("WARNED|" + "|".join(str(w.message) for w in caught))
"""


@pytest.mark.parametrize("mode", ["quiet", "verbose"])
def test_noise_is_hidden_by_logger_and_message_and_nothing_else(mode, tmp_path):
    """`noise.quiet` drops exactly the listed lines: the same logger's other lines, another deprecation and
    another env's override warning still show; without it (`--verbose`) every line shows."""
    out = subprocess.run([sys.executable, "-c", NOISE_PROBE, mode], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert sum("raycraft's own line" in line for line in lines) == len(noise.LOGGED)
    assert "ray._common.deprecation|DeprecationWarning: `ray.foo` has been deprecated." in lines
    hidden = ["You are running DQN", "Creating initial MLflow", "rllib-single-agent-env-v0"]
    assert all(any(h in line for line in lines) == (mode == "verbose") for h in hidden), lines
    assert "CartPole-v1 already" in lines[-1]


@pytest.mark.slow
def test_an_rl_run_hides_ray_s_noise_in_the_driver_and_the_workers_and_verbose_shows_it(tmp_path):
    """`raycraft rl` with an env runner (a Ray worker): RLlib's deprecation line comes from the driver and from
    the worker; quiet, stderr holds none of the listed lines; `raycraft --verbose` shows them, the worker's too.
    Ray Tune's system monitor, which asks for GPUtil, is not started at all (`log_sys_usage=False`)."""
    args = ["rl", "dqn", "--env", "CartPole-v1", "--timesteps", "500", "--workers", "1"]
    quiet = run_raycraft(args, tmp_path)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    verbose = run_raycraft(["--verbose", *args], tmp_path)
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    for line in ("Token authentication is enabled", "on the new API stack!"):
        assert line not in quiet.stderr and line in verbose.stderr, line
    assert "Install gputil" not in verbose.stderr
    deprecation = "`RLModule(config=[RLModuleConfig object])` has been deprecated"
    assert deprecation not in quiet.stderr and verbose.stderr.count(deprecation) >= 2, verbose.stderr
    assert "Traceback" not in quiet.stderr and "iter 1 " in quiet.stdout


def test_json_output_is_strict_json_when_a_metric_diverged(capsys):
    from raycraft.commands.runs import print_json

    print_json({"run": {"val_loss": float("nan"), "grad_norm": float("inf"), "epochs": [1.5, float("-inf")]}})
    out = capsys.readouterr().out
    assert "NaN" not in out and "Infinity" not in out
    assert json.loads(out) == {"run": {"val_loss": None, "grad_norm": None, "epochs": [1.5, None]}}
