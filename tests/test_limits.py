"""Input limits through the installed `raycraft` executable: YAML alias bombs and oversized config text, and
counts past their maxima, exit 2 at once with a message naming the source or flag and the limit, before any
MLflow run exists; long generation shows a progress bar on stderr and leaves stdout as it was."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import RAYCRAFT, assert_refused
from raycraft.config import MAX_YAML_BYTES, read_yaml
from raycraft.errors import UserError

RUN_ID = "0123456789abcdef"
TIMEOUT_S = 60  # a limit is checked within the command's start-up; without one these run until killed
HUGE = str(10**23)


def laughs(depth: int = 30) -> str:
    """A billion-laughs flow list: each level an anchor over ten copies of the level below, 10**depth values."""
    node = "&l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"
    for i in range(1, depth + 1):
        node = f"&l{i} [{node}" + f", *l{i - 1}" * 9 + "]"
    return node


def run(args: list[str], cwd: Path, uri: str | None = None) -> subprocess.CompletedProcess:
    """The command's result; on timeout its whole process group (Ray included) is killed, returncode None."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri or f"sqlite:///{cwd / 'mlflow.db'}"}
    with subprocess.Popen([str(RAYCRAFT), *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            return subprocess.CompletedProcess(args, None, out, f"{err}\n[killed after {TIMEOUT_S} s]")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def run_all(cases: dict[str, list[str]], cwd_of, uri: str | None = None) -> dict[str, subprocess.CompletedProcess]:
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(cases, pool.map(lambda name: run(cases[name], cwd_of(name), uri), cases), strict=True))


MLP = ["train", "mlp", "--dataset", "digits", "--in-process"]
REJECTED = {
    "--config bomb": (["--config", "bomb.yaml"], ["--config bomb.yaml", "100,000 values", "YAML aliases"]),
    "--config too large": (["--config", "big.yaml"], ["--config big.yaml", "1,048,577 bytes", "1,048,576"]),
    "--set bomb": (["--set", f"hidden={laughs()}"], ["--set hidden", "100,000 values", "YAML aliases"]),
    "--epochs": (["--epochs", HUGE], ["--epochs", HUGE, "maximum of 100,000"]),
    "--timesteps": (["rl", "dqn", "--env", "CartPole-v1", "--timesteps", HUGE],
                    ["--timesteps", HUGE, "maximum of 10,000,000,000"]),
    "--tokens": (["generate", RUN_ID, "--tokens", str(10**12)], ["--tokens", str(10**12), "maximum of 1,000,000"]),
    "--n": (["sample", RUN_ID, "--n", str(10**8)], ["--n", str(10**8), "maximum of 100,000"]),
}


@pytest.fixture(scope="module")
def rejected(tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    for name in REJECTED:
        (root / name).mkdir()
    (root / "--config bomb" / "bomb.yaml").write_text(
        f"model: mlp\ndataset: digits\nmodel_args:\n  hidden: {laughs()}\n")
    (root / "--config too large" / "big.yaml").write_text(
        "model: mlp\ndataset: digits\n" + "#" * (MAX_YAML_BYTES - 27) + "\n")
    cases = {name: args if args[0] in ("rl", "generate", "sample") else [*MLP, *args]
             for name, (args, _) in REJECTED.items()}
    return run_all(cases, lambda name: root / name), root


@pytest.mark.parametrize("case", list(REJECTED))
def test_over_the_limit_exits_2_naming_it_before_mlflow(case, rejected):
    outs, root = rejected
    assert_refused(outs[case], REJECTED[case][1])
    assert not (root / case / "mlflow.db").exists(), "a rejected command created an MLflow store"


def test_alias_bomb_and_cycle_are_rejected_in_well_under_a_second_of_cpu():
    for text in (f"hidden: {laughs(60)}", "hidden: &a [1, *a]"):
        start = time.process_time()
        with pytest.raises(UserError, match="--set hidden: more than 100,000 values once its YAML aliases"):
            read_yaml(text, "--set hidden")
        assert time.process_time() - start < 0.5


def test_aliases_within_the_limit_load_as_shared_values():
    data = read_yaml("base: &b {lr: 0.1}\nrun: *b\nlist: &l [1, 2]\nnested: [*l, *l]", "--config c.yaml")
    assert data == {"base": {"lr": 0.1}, "run": {"lr": 0.1}, "list": [1, 2], "nested": [[1, 2], [1, 2]]}


# --- commands on runs of a real store: a resumed bomb, and progress bars ----------------------------------

PROMPT = "ab"


def _log_run(uri: str, tmp: Path, name: str, cfg, model, extra: dict[str, Path] | None = None,
             config_yaml: str | None = None) -> str:
    """A finished-looking run: config.yaml and the checkpoint `rebuild_model` reads (no training)."""
    import torch
    import yaml

    from raycraft.config import to_dict
    from raycraft.tracking import Run
    from raycraft.train.loop import CHECKPOINT_FILE

    run = Run.start(uri, "limits", name, {}, {}, config_yaml or yaml.safe_dump(to_dict(cfg)))
    folder = tmp / name
    folder.mkdir()
    torch.save({"model": model.state_dict()}, folder / CHECKPOINT_FILE)
    run.log_artifacts(folder, "checkpoint")
    for artifact_path, local in (extra or {}).items():
        run.log_artifacts(local, artifact_path)
    return run.run_id


def _language_model_run(uri: str, tmp: Path) -> str:
    from raycraft.models import tokenizers
    from raycraft.registry import create_model
    from raycraft.text.step import TOKENIZER_FILE
    from raycraft.train.config import build_config

    cfg, model_cfg = build_config({"model": "transformer", "dataset": "shakespeare"},
                                  ["d_model=16", "n_heads=2", "n_layers=1", "d_ff=32", "data.seq_len=16"])
    tok = tokenizers.CharTokenizer(list("ab \n"))
    info = {"vocab_size": tok.vocab_size, "seq_len": cfg.data.seq_len, "tokenizer": tok.to_dict()}
    plots = tmp / "lm_plots"
    plots.mkdir()
    tokenizers.save(tok, plots / TOKENIZER_FILE)
    return _log_run(uri, tmp, "lm", cfg, create_model(cfg.model, model_cfg, info), {"plots": plots})


def _vae_run(uri: str, tmp: Path, config_yaml: str | None = None) -> str:
    from raycraft.registry import create_model, load_dataset
    from raycraft.train.config import build_config

    cfg, model_cfg = build_config({"model": "vae", "dataset": "digits"}, ["width=4", "quality_samples=0"])
    model = create_model(cfg.model, model_cfg, load_dataset(cfg.dataset, cfg.data).info)
    return _log_run(uri, tmp, "bomb" if config_yaml else "vae", cfg, model, config_yaml=config_yaml)


@pytest.fixture(scope="module")
def on_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    lm, vae = _language_model_run(uri, tmp), _vae_run(uri, tmp)
    bomb = _vae_run(uri, tmp, f"model: vae\ndataset: digits\nmodel_args: {{}}\nstorage_path: {laughs()}\n")
    cases = {"generate long": ["generate", lm, "--prompt", PROMPT, "--tokens", "1000"],
             "generate short": ["generate", lm, "--prompt", PROMPT, "--tokens", "10"],
             "sample long": ["sample", vae, "--n", "501", "--out", "g.png"],
             "resume bomb": ["train", "--resume", bomb, "--in-process"]}
    return run_all(cases, lambda name: tmp, uri), bomb


def test_long_generation_shows_progress_on_stderr_only(on_runs):
    outs, _ = on_runs
    long, short = outs["generate long"], outs["generate short"]
    assert long.returncode == 0 and short.returncode == 0, long.stderr + short.stderr
    assert "generating 1,000 tokens" in long.stderr and "1000/1000" in long.stderr, long.stderr
    assert long.stdout.startswith(PROMPT) and len(long.stdout) >= len(PROMPT) + 1000
    assert "generating" not in long.stdout + short.stdout + short.stderr


def test_sampling_many_shows_progress_on_stderr_only(on_runs):
    out = on_runs[0]["sample long"]
    assert out.returncode == 0, out.stderr
    assert "drawing 501 samples" in out.stderr and "501/501" in out.stderr, out.stderr
    assert out.stdout.startswith("wrote 256 of 501 samples") and "drawing" not in out.stdout


def test_resumed_run_whose_config_is_a_bomb_exits_2(on_runs):
    outs, bomb = on_runs
    out = outs["resume bomb"]
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"run {bomb}'s config.yaml: more than 100,000 values" in out.stderr, out.stderr
