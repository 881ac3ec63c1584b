"""`raycraft rl` end to end on real RLlib: tiny DQN, DDPG and Pong runs, resume, reload, GIF."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from raycraft import checksums
from raycraft.rl.config import build_rl_config
from raycraft.rl.replay import ARRAYS_FILE
from raycraft.rl.run import POLICY_FILE, evaluate_rl, logged_policy, train_rl

pytestmark = pytest.mark.slow


def tiny(algo: str, env: str, storage: str, **keys):
    base = {"algo": algo, "env": env, "storage_path": storage, "steps_per_iter": 100, "learning_starts": 50,
            "eval_episodes": 1, "checkpoint_every": 1, **keys}
    return build_rl_config(base, [])


def assert_rates_add_up(history: list[dict[str, float]]) -> None:
    """steps_per_s is an iteration's env steps over its own time: from the second iteration on, rate times
    the wall time between iterations gives back the steps sampled; the first one took at most its wall_s."""
    assert len(history) >= 2
    first = history[0]
    assert first["env_steps"] > 0 and first["steps_per_s"] * first["wall_s"] >= first["env_steps"]
    for before, m in itertools.pairwise(history):
        assert m["env_steps"] > before["env_steps"] and m["wall_s"] > before["wall_s"]
        assert m["steps_per_s"] * (m["wall_s"] - before["wall_s"]) == pytest.approx(
            m["env_steps"] - before["env_steps"], rel=1e-6)


def test_dqn_train_resume_reload_gif(ray_session, mlflow_uri, storage, tmp_path):
    from mlflow.tracking import MlflowClient
    from ray.rllib.core.columns import Columns
    from ray.rllib.core.rl_module.rl_module import RLModule

    cfg, model_cfg = tiny("dqn", "CartPole-v1", storage, timesteps=200, replay={"save_in_checkpoint": True})
    first = train_rl(cfg, model_cfg, tracking_uri=mlflow_uri)
    assert first.env_steps >= 200 and first.iterations == 2
    assert_rates_add_up(first.history)
    assert (Path(first.checkpoint) / ARRAYS_FILE).is_file()
    assert checksums.problem(first.checkpoint, signed=True) is None
    client = MlflowClient(mlflow_uri)
    run = client.get_run(first.run_id)
    assert {"return_mean", "eval_return_mean", "steps_per_s", "env_steps"} <= set(run.data.metrics)
    assert {a.path for a in client.list_artifacts(first.run_id)} >= {"policy", "returns.png", "config.yaml"}
    assert [a.path for a in client.list_artifacts(first.run_id, "policy")] == [POLICY_FILE]

    # The logged policy and the algorithm checkpoint hold the same network: identical greedy actions.
    logged, _ = logged_policy(mlflow_uri, first.run_id)
    saved = RLModule.from_checkpoint(f"{first.checkpoint}/learner_group/learner/rl_module/default_policy")
    obs = {Columns.OBS: torch.as_tensor(np.random.default_rng(0).normal(size=(64, 4)), dtype=torch.float32)}
    assert torch.equal(logged.forward_inference(obs)[Columns.ACTIONS], saved.forward_inference(obs)[Columns.ACTIONS])

    cfg, model_cfg = tiny("dqn", "CartPole-v1", storage, timesteps=400)
    second = train_rl(cfg, model_cfg, tracking_uri=mlflow_uri, resume_run_id=first.run_id)
    assert second.run_id == first.run_id
    assert second.history[0]["env_steps"] > first.env_steps  # step counters continue
    sampled_since = second.history[0]["env_steps"] - first.env_steps
    assert second.history[0]["replay_size"] > sampled_since  # the buffer came back with the checkpoint
    assert second.history[0]["iteration"] == first.iterations + 1
    assert second.env_steps >= 400
    steps = [m.value for m in client.get_metric_history(first.run_id, "env_steps")]
    assert steps == sorted(steps) and len(steps) == first.iterations + second.iterations - first.iterations

    gif = tmp_path / "episode.gif"
    returns = evaluate_rl(first.run_id, episodes=2, video=gif, tracking_uri=mlflow_uri)
    assert len(returns) == 2 and all(r >= 1 for r in returns)
    assert gif.stat().st_size > 1000
    assert "rl_eval_return_mean" in client.get_run(first.run_id).data.metrics


def test_ddpg_pendulum_runs(ray_session, mlflow_uri, storage):
    cfg, model_cfg = tiny("ddpg", "Pendulum-v1", storage, timesteps=400, batch_size=32, training_intensity=32,
                          replay={"prioritized": True})  # also exercises importance weights in DDPG's loss
    out = train_rl(cfg, model_cfg, tracking_uri=mlflow_uri)
    assert out.env_steps >= 400
    assert all(-2000 < m["eval_return_mean"] <= 0 for m in out.history if "eval_return_mean" in m)


def test_pong_nature_cnn_runs(ray_session, mlflow_uri, storage):
    cfg, model_cfg = tiny("dqn", "ALE/Pong-v5", storage, timesteps=200, batch_size=8, training_intensity=8,
                          eval_interval=1000, replay={"capacity": 1000}, steps_per_iter=100)
    assert cfg.model == "q_nature_cnn"
    out = train_rl(cfg, model_cfg, tracking_uri=mlflow_uri)
    assert out.env_steps >= 200
    assert_rates_add_up(out.history)
