"""The architecture holds: the layer contracts, few and explained deferred imports, short functions, and a new
family plugs in exactly as docs/architecture.md says."""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

import raycraft
from conftest import REPO
from raycraft import registry, tracking

SOURCES = [p for d in ("platform", "models", "envs") for p in sorted((REPO / d).rglob("*.py"))]
MAX_LOCAL_IMPORTS = 20
MAX_FUNCTION_LINES = 60


def test_layer_contracts_hold():
    out = subprocess.run([Path(sys.executable).with_name("lint-imports")], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"Contracts: [1-9]\d* kept, 0 broken", out.stdout), out.stdout


def test_every_module_has_a_layer():
    """A new top-level module or package must be placed in the layers (import-linter checks only those named)."""
    text = (REPO / "pyproject.toml").read_text()
    layers = text.split('type = "layers"', 1)[1].split("]", 1)[0]
    named = set(re.findall(r"raycraft\.(\w+)", layers))
    tops = {p.stem for p in (REPO / "platform").glob("*.py")} | {
        p.name for p in (REPO / "platform").iterdir() if (p / "__init__.py").exists()} | {"models", "envs"}
    assert tops == named, f"not in a layer: {sorted(tops - named)}; not a module: {sorted(named - tops)}"


def local_imports(path: Path) -> list[tuple[int, str]]:
    """(line, source line) of every import statement inside a function of `path`."""
    lines = path.read_text().splitlines()
    found = set()
    for fn in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found |= {node.lineno for node in ast.walk(fn) if isinstance(node, (ast.Import, ast.ImportFrom))}
    return [(n, lines[n - 1]) for n in sorted(found)]


def test_function_local_imports_are_few_and_each_says_why():
    """An import inside a function only defers a heavy module or an optional extra, and says so."""
    found = [(path, n, line) for path in SOURCES for n, line in local_imports(path)]
    assert len(found) < MAX_LOCAL_IMPORTS, "\n".join(f"{p.relative_to(REPO)}:{n}" for p, n, _ in found)
    for path, n, line in found:
        above = path.read_text().splitlines()[n - 2].strip()
        assert "#" in line or above.startswith("#"), f"{path.relative_to(REPO)}:{n} defers an import without a reason"


def test_no_function_is_longer_than_a_screen():
    long = [f"{p.relative_to(REPO)}:{node.lineno} {node.name}" for p in SOURCES
            for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long


def documented_family() -> tuple[dict[str, str], str]:
    """The code blocks of docs/architecture.md's "Adding a model family": {path: code}, registration line."""
    text = (REPO / "docs" / "architecture.md").read_text().split("## Adding a model family", 1)[1]
    files, registration = {}, ""
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        first = block.splitlines()[0]
        if first.startswith("# ") and first.endswith(".py"):
            files[first[2:]] = block
        else:
            registration = block
    return files, registration


@pytest.fixture
def documented_family_installed(tmp_path, monkeypatch):
    """The documented family written out: its package as a portion of the `raycraft` namespace (as
    platform/regression/ would be), its model and dataset modules imported, its registration line run."""
    files, registration = documented_family()
    assert set(files) == {"models/regression.py", "platform/data/sine.py", "platform/regression/step.py"}
    package = tmp_path / "raycraft" / "regression"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""The regression family."""\n')
    (package / "step.py").write_text(files["platform/regression/step.py"])
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("models/regression.py", "platform/data/sine.py"):
        path = tmp_path / Path(name).name
        path.write_text(files[name])
        spec = importlib.util.spec_from_file_location(f"documented_{path.stem}", path)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    exec(registration, vars(registry))
    assert str(tmp_path / "raycraft") in list(raycraft.__path__)
    yield
    for table, key in ((registry._FAMILIES, "regression"), (registry._MODELS, "sine_mlp"),
                       (registry._DATASETS, "sine")):
        table.pop(key, None)
    sys.modules.pop("raycraft.regression.step", None)
    sys.modules.pop("raycraft.regression", None)


def test_a_new_family_trains_as_documented(documented_family_installed, tmp_path, monkeypatch):
    """`raycraft train sine_mlp --dataset sine` through the CLI's own entry point, in this process (where the
    family was registered): the run finishes and the fit beats predicting the mean (MSE about 0.47)."""
    from raycraft.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["raycraft", "train", "sine_mlp", "--dataset", "sine", "--in-process",
                                      "--epochs", "30", "--set", "optim.lr=0.01", "--tracking-uri", uri,
                                      "--experiment", "documented-family"])
    try:
        main(use_warm=False)
    except SystemExit as exc:
        assert exc.code == 0, exc
    (run,) = tracking.search_runs(uri, "documented-family")
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test_loss"] < 0.2
