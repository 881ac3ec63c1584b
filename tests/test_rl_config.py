"""`raycraft rl` input checks: every bad input is a UserError before Ray starts."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from conftest import assert_every_form_refused_alike, run_raycraft
from raycraft.errors import UserError
from raycraft.models.rl import QMLPConfig
from raycraft.rl.config import build_rl_config
from raycraft.rl.run import prepare


def check(base: dict, overrides: list[str] | None = None):
    cfg, model_cfg = build_rl_config(base, overrides or [])
    return prepare(cfg, model_cfg)


def test_presets_flags_and_set_routing():
    cfg, model_cfg = build_rl_config({"algo": "dqn", "env": "CartPole-v1"},
                                     ["dueling=false", "dqn.epsilon_timesteps=5", "replay.prioritized=false"])
    assert cfg.model == "q_mlp" and isinstance(model_cfg, QMLPConfig)
    assert model_cfg.dueling is False and model_cfg.hiddens == (128,)  # preset kept, --set applied
    assert cfg.dqn.epsilon_timesteps == 5 and cfg.replay.prioritized is False
    assert cfg.training_intensity == 32 and cfg.batch_size == 32
    cfg, _ = build_rl_config({"algo": "dqn", "env": "ALE/Pong-v5"}, [])
    assert cfg.model == "q_nature_cnn"


@pytest.mark.parametrize(("base", "overrides", "message"), [
    ({"algo": "ddpg", "env": "CartPole-v1"}, [], "DDPG needs a continuous"),
    ({"algo": "dqn", "env": "Pendulum-v1"}, [], "DQN picks one of finitely many"),
    ({"algo": "dqn", "env": "Pendulm-v1"}, [], "Did you mean 'Pendulum-v1'"),
    ({"algo": "ddpg", "env": "Pendulum-v1", "model": "q_mlp"}, [], "lacks DeterministicActorCriticAPI"),
    ({"algo": "dqn", "env": "CartPole-v1", "model": "ddpg_mlp"}, [], "'ddpg_mlp' is a DDPG model; it lacks QNetAPI"),
    ({"algo": "dqn", "env": "CartPole-v1", "model": "lenet5"}, [], "not an RL policy"),
    ({"algo": "dqn", "env": "CartPole-v1", "model": "q_mpl"}, [], "Did you mean 'q_mlp'"),
    ({"algo": "a2c", "env": "CartPole-v1"}, [], "ALGO"),
    ({"algo": "dqn", "env": "CartPole-v1"}, ["dqn.epsilon_timestep=5"], "epsilon_timesteps"),
    ({"algo": "dqn", "env": "CartPole-v1"}, ["gamma=1.5"], "gamma"),
    ({"algo": "dqn", "env": "CartPole-v1"}, ["activation=gelu"], "activation"),
])
def test_bad_input_is_a_user_error(base, overrides, message):
    with pytest.raises(UserError, match=message):
        check(base, overrides)


def test_cli_prints_error_without_traceback(tmp_path):
    raycraft = [sys.executable, "-c", "from raycraft.cli import main; main()"]
    out = subprocess.run([*raycraft, "rl", "ddpg", "--env", "CartPole-v1"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "DDPG needs a continuous" in out.stderr and "Traceback" not in out.stderr


# As for `raycraft train` (tests/test_config.py): each form of one bad value names the same field.
SAME_FIELD = {
    "ddpg.tau": (["ddpg.tau: 2", "ddpg: {tau: 2}"], "ddpg.tau=2", "ddpg.tau: must be in (0, 1], got 2.0."),
    "activation": (["activation: gelu", "model_args.activation: gelu", "model_args: {activation: gelu}"],
                   "activation=gelu",
                   "model_args.activation: 'gelu' is not valid. Did you mean 'relu'? Valid choices: relu, tanh."),
}


@pytest.mark.parametrize("field", list(SAME_FIELD))
def test_config_file_takes_the_keys_set_takes(tmp_path, field):
    assert_every_form_refused_alike(build_rl_config, "algo: dqn\nenv: CartPole-v1\n", *SAME_FIELD[field], tmp_path)


@pytest.mark.slow
def test_dotted_nested_and_model_keys_of_a_config_file_reach_the_run(tmp_path):
    (tmp_path / "rl.yaml").write_text(
        "timesteps: 200\nsteps_per_iter: 100\nlearning_starts: 50\neval_episodes: 1\n"
        "dqn.epsilon_timesteps: 150\n"  # dotted, over the default 10000
        "replay: {capacity: 1000}\n"  # nested: merged into the preset's replay
        "dueling: false\nmodel_args.hiddens: [16]\n")  # model keys, without and with the prefix
    out = run_raycraft(["rl", "dqn", "--env", "CartPole-v1", "--config", "rl.yaml"], tmp_path, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    run_id = re.search(r"run id: (\w{32})", out.stdout).group(1)
    params = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id).data.params
    assert {k: params[k] for k in ("timesteps", "dqn.epsilon_timesteps", "dqn.target_update_freq", "replay.capacity",
                                   "replay.prioritized", "model_args.dueling", "model_args.hiddens",
                                   "model_args.head_hiddens")} == {
        "timesteps": "200", "dqn.epsilon_timesteps": "150", "dqn.target_update_freq": "500",
        "replay.capacity": "1000", "replay.prioritized": "True", "model_args.dueling": "False",
        "model_args.hiddens": "[16]", "model_args.head_hiddens": "[128]"}
