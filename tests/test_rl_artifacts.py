"""RL artifacts from a tracking server are never unpickled: `raycraft rl-eval` loads tensors only, and
`raycraft rl --resume` loads an RLlib checkpoint, from its folder or from the run's artifact, only when this
account's raycraft signed it."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from conftest import RAYCRAFT
from raycraft import checksums
from raycraft.config import to_dict
from raycraft.errors import UserError
from raycraft.evaluate import run_config
from raycraft.rl.config import build_rl_config
from raycraft.rl.run import CHECKPOINT_ARTIFACT, CHECKPOINT_TAG, trusted_checkpoint


class Exploit:
    """Unpickling it creates the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def cli(tmp_path: Path, *args: str, home: Path | None = None,
        unset: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "RAYCRAFT_WARM_DIR": str(tmp_path / "warm"), **({"RAYCRAFT_HOME": str(home)} if home else {})}
    env = {k: v for k, v in env.items() if k not in unset}
    return subprocess.run([str(RAYCRAFT), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


def crafted_run(tmp_path: Path, tags: dict[str, str]) -> tuple[MlflowClient, str]:
    """A finished `raycraft rl` DQN CartPole run, as anyone with write access to the server can log it."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("crafted", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp, tags={"raycraft.task": "rl", **tags}).info.run_id
    cfg, model_cfg = build_rl_config({"algo": "dqn", "env": "CartPole-v1"}, [])
    client.log_text(run_id, yaml.safe_dump({**to_dict(cfg), "model_args": to_dict(model_cfg)}, sort_keys=False),
                    "config.yaml")
    client.set_terminated(run_id, "FINISHED")
    return client, run_id


@pytest.mark.parametrize("weights", [True, False], ids=["pickled-weights", "rllib-checkpoint-only"])
def test_rl_eval_never_unpickles_a_logged_policy(tmp_path, weights):
    marker = tmp_path / "pwned"
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "class_and_ctor_args.pkl").write_bytes(pickle.dumps(Exploit(marker)))
    if weights:
        torch.save({"advantage.0.weight": Exploit(marker)}, policy / "weights.pt")
    client, run_id = crafted_run(tmp_path, {})
    client.log_artifacts(run_id, str(policy), "policy")

    out = cli(tmp_path, "rl-eval", run_id, "--episodes", "1")
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
    message = " ".join(out.stderr.split())
    assert run_id in message and "policy/weights.pt" in message
    assert ("is not a file of tensors" if weights else "has no policy/weights.pt") in message
    assert not marker.exists()


def test_train_commands_point_an_rl_run_to_rl_eval(tmp_path):
    _, run_id = crafted_run(tmp_path, {})
    with pytest.raises(UserError, match=f"is a `raycraft rl` run: play its policy with `raycraft rl-eval {run_id}`"):
        run_config(f"sqlite:///{tmp_path / 'mlflow.db'}", run_id)


@pytest.mark.parametrize(("manifest", "where"), [("none", "folder"), ("unsigned", "folder"), ("other-key", "folder"),
                                                 ("other-key", "artifact")])
def test_resume_refuses_a_checkpoint_this_account_did_not_sign(tmp_path, monkeypatch, manifest, where):
    """A tag pointed at someone else's folder, or a checkpoint artifact someone else logged (on another machine,
    where the tagged folder is not): refused before anything but the manifest is read or downloaded."""
    marker = tmp_path / "pwned"
    folder = tmp_path / "elsewhere" / "checkpoint"
    folder.mkdir(parents=True)
    (folder / "algorithm_state.pkl").write_bytes(pickle.dumps(Exploit(marker)))
    if manifest == "unsigned":
        checksums.write_manifest(folder)
    if manifest == "other-key":
        with monkeypatch.context() as m:
            m.setenv("RAYCRAFT_HOME", str(tmp_path / "other-account"))
            checksums.write_manifest(folder, sign=True)
    client, run_id = crafted_run(tmp_path, {CHECKPOINT_TAG: str(folder)})
    if where == "artifact":
        client.log_artifacts(run_id, str(folder), CHECKPOINT_ARTIFACT)
        client.set_tag(run_id, CHECKPOINT_TAG, "/on/another/machine/checkpoint")

    out = cli(tmp_path, "rl", "dqn", "--resume", run_id, "--timesteps", "200")
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
    message = " ".join(out.stderr.split())
    shown = f"at {folder}" if where == "folder" else f"of run {run_id} in MLflow"
    assert f"the checkpoint {shown} is refused" in message and "this account" in message
    assert "signing.key" in message  # what another machine of the same account needs
    assert not marker.exists()
    assert not any(p.name == "algorithm_state.pkl" for p in (tmp_path / "ray_results").rglob("*"))
    assert client.get_run(run_id).info.status == "FINISHED"


def test_resume_completes_a_killed_save_and_leaves_unsigned_folders_alone(tmp_path):
    ours, theirs = tmp_path / "ours" / "checkpoint", tmp_path / "theirs" / "data"
    for folder in (ours, theirs):
        folder.mkdir(parents=True)
        (folder / "algorithm_state.pkl").write_bytes(b"state")
    checksums.write_manifest(ours, sign=True)
    ours.rename(f"{ours}.old")  # killed between save_checkpoint's two renames: only .old and .tmp remain
    Path(f"{ours}.tmp").mkdir()
    Path(f"{theirs}.old").mkdir()
    client, run_id = crafted_run(tmp_path, {CHECKPOINT_TAG: str(ours)})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert trusted_checkpoint(uri, client.get_run(run_id), tmp_path / "unused") == ours
    assert (ours / "algorithm_state.pkl").is_file()
    assert not Path(f"{ours}.old").exists() and not Path(f"{ours}.tmp").exists()

    client.set_tag(run_id, CHECKPOINT_TAG, str(theirs))
    with pytest.raises(UserError, match="is refused"):
        trusted_checkpoint(uri, client.get_run(run_id), tmp_path / "unused")
    assert Path(f"{theirs}.old").is_dir()


@pytest.mark.slow
def test_cli_train_eval_resume(tmp_path):
    """The real path: a tiny CartPole DQN run, its policy played, and its checkpoint resumed, but only by
    the account that wrote it."""
    train = cli(tmp_path, "rl", "dqn", "--env", "CartPole-v1", "--timesteps", "200", "--set", "steps_per_iter=100",
                "--set", "learning_starts=50", "--set", "eval_episodes=1", "--set", "checkpoint_every=1")
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-3000:]
    run_id = re.search(r"run id: (\w{32})", train.stdout).group(1)

    # A headless machine (no sound card, no XDG_RUNTIME_DIR): drawing the GIF's frames prints nothing of ALSA/SDL.
    played = cli(tmp_path, "rl-eval", run_id, "--episodes", "2", "--video", "episode.gif", unset=("XDG_RUNTIME_DIR",))
    assert played.returncode == 0, played.stderr[-3000:]
    assert "mean return" in played.stdout and "over 2 episodes" in played.stdout
    assert (tmp_path / "episode.gif").stat().st_size > 1000
    assert not re.search("ALSA|XDG_RUNTIME_DIR", played.stdout + played.stderr), played.stderr[-3000:]

    other = cli(tmp_path, "rl", "dqn", "--resume", run_id, "--timesteps", "400", home=tmp_path / "other-account")
    assert other.returncode == 2 and "is refused" in other.stderr, other.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "FINISHED"

    resumed = cli(tmp_path, "rl", "dqn", "--resume", run_id, "--timesteps", "400")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    steps = [m.value for m in client.get_metric_history(run_id, "env_steps")]
    assert steps == sorted(steps) and steps[0] < 400 <= steps[-1] and len(steps) >= 4
