"""Bad input: exit code 2, a message naming field, value and choices, no traceback, no Ray started."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

CASES = {
    "unknown model": (["train", "lenett5", "--dataset", "digits"], ["model", "'lenett5'", "lenet5"]),
    "unknown dataset": (["train", "lenet5", "--dataset", "digit"], ["dataset", "'digit'", "digits"]),
    "unknown --set key": (["train", "lenet5", "--dataset", "digits", "--set", "optim.lrate=1"],
                          ["unknown key", "'lrate'", "lr"]),
    "wrong --set type": (["train", "lenet5", "--dataset", "digits", "--set", "epochs=many"],
                         ["epochs", "expected an integer", "'many'"]),
    "zero workers": (["train", "lenet5", "--dataset", "digits", "--workers", "0"], ["--workers", "0", "--in-process"]),
    "in-process with workers": (["train", "lenet5", "--dataset", "digits", "--in-process", "--workers", "2"],
                                ["--in-process", "--workers 2"]),
    "in-process with an address": (["train", "lenet5", "--dataset", "digits", "--in-process", "--address",
                                    "127.0.0.1:6379"], ["--address", "127.0.0.1:6379", "--in-process"]),
    "missing data dir": (["train", "lenet5", "--dataset", "cifar10"], ["--data-dir", "cifar10"]),
    "absent data dir": (["train", "lenet5", "--dataset", "cifar10", "--data-dir", "/nonexistent/x"],
                        ["--data-dir", "/nonexistent/x"]),
    "malformed yaml": (["train", "--config", "{bad_yaml}"], ["not valid YAML", "line"]),
    "language model on images": (["train", "transformer", "--dataset", "digits"],
                            ["'digits'", "language-model", "shakespeare"]),
    "unknown attention kind": (["train", "transformer", "--dataset", "shakespeare", "--set", "attention=performr"],
                               ["attention", "'performr'", "performer", "linformer"]),
    "unknown position kind": (["train", "transformer", "--dataset", "shakespeare", "--set", "position=rotery"],
                              ["position", "'rotery'", "rotary", "sinusoidal"]),
    "n_heads not dividing d_model": (["train", "transformer", "--dataset", "shakespeare", "--set", "d_model=128",
                                      "--set", "n_heads=3"],
                                     ["n_heads", "3", "d_model=128"]),
    "lora rank larger than the layer": (["train", "transformer", "--dataset", "shakespeare", "--set",
                                         "d_model=128", "--set", "lora.rank=512"], ["lora.rank", "512", "128x128"]),
    "causal linformer": (["train", "transformer", "--dataset", "shakespeare", "--set", "attention=linformer"],
                         ["linformer", "causal=false"]),
    "generate zero tokens": (["generate", "0123456789abcdef", "--tokens", "0"], ["--tokens", "0"]),
    "time-series model on images": (["train", "kalman", "--dataset", "digits"], ["'digits'", "time-series", "nile"]),
    "non-square transition": (["train", "kalman", "--dataset", "nile", "--set", "A=[[1, 0]]"],
                              ["A:", "square", "(1, 2)"]),
    "covariance not positive definite": (["train", "kalman", "--dataset", "nile", "--set", "R=[[-2.0]]"],
                                         ["R:", "not positive definite"]),
    "unknown run": (["eval", "0123456789abcdef"], ["RUN_ID", "0123456789abcdef"]),
}
if not torch.cuda.is_available():
    CASES["gpu without one"] = (["train", "lenet5", "--dataset", "digits", "--gpu"], ["--gpu", "no CUDA GPU"])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    bad_yaml = tmp / "bad.yaml"
    bad_yaml.write_text("model: lenet5\ndataset: [digits\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}

    def run(args):
        args = [a.replace("{bad_yaml}", str(bad_yaml)) for a in args]
        return subprocess.run([sys.executable, "-m", "raycraft.cli", *args], cwd=tmp, env=env,
                              capture_output=True, text=True, timeout=120)

    with ThreadPoolExecutor(2) as pool:
        return dict(zip(CASES, pool.map(run, [c[0] for c in CASES.values()]), strict=True))


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_clear_message(case, results):
    out = results[case]
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert "Traceback" not in text
    assert "Started a local Ray instance" not in text and "ray_results" not in text
    for word in CASES[case][1]:
        assert word in text, f"{word!r} missing from: {text}"
