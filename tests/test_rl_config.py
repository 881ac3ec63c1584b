"""`raycraft rl` input checks: every bad input is a UserError before Ray starts."""

from __future__ import annotations

import subprocess
import sys

import pytest

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
