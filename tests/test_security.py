"""No bare unpickling of user-supplied files: checkpoints load with weights_only=True, models through MLflow."""

from __future__ import annotations

import ast
import os

import pytest
import torch

from conftest import REPO
from raycraft.train.loop import CHECKPOINT_FILE, load_state

SOURCES = [p for d in ("platform", "models", "envs") for p in (REPO / d).rglob("*.py")]


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_every_torch_load_is_weights_only_and_nothing_unpickles():
    found = []
    for path in SOURCES:
        for call, name in _calls(ast.parse(path.read_text())):
            kwargs = {k.arg: ast.unparse(k.value) for k in call.keywords}
            where = f"{path.relative_to(REPO)}:{call.lineno}"
            if name == "torch.load" and kwargs.get("weights_only") != "True":
                found.append(f"{where}: torch.load without weights_only=True")
            if name in ("pickle.load", "pickle.loads", "cloudpickle.load", "cloudpickle.loads", "joblib.load",
                        "dill.load", "dill.loads"):
                found.append(f"{where}: {name}")
            if name.endswith("np.load") and kwargs.get("allow_pickle") == "True":
                found.append(f"{where}: np.load(allow_pickle=True)")
    assert not found, found
    assert any("weights_only=True" in p.read_text() for p in SOURCES)  # the scan sees the checkpoint loader


def test_checkpoint_with_code_in_it_is_refused(tmp_path):
    torch.save({"model": {"w": torch.zeros(2)}, "history": [], "trainer": Exploit()}, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(Exception, match="Weights only load failed"):
        load_state(tmp_path)
    torch.save({"model": {"w": torch.ones(2)}, "history": [{"epoch": 0.0}], "trainer": {}}, tmp_path / CHECKPOINT_FILE)
    assert load_state(tmp_path)["model"]["w"].sum() == 2
