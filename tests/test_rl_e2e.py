"""`raycraft rl` end to end on real RLlib: tiny DQN, DDPG and Pong runs, resume (from the checkpoint on disk
and from its MLflow artifact), reload (rl-eval's tensors and the MLflow model), GIF."""

from __future__ import annotations

import itertools
import re
import shutil
import sys
import threading
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_RL_MODULE, DEFAULT_MODULE_ID
from ray.tune.utils import UtilMonitor

from raycraft import checksums
from raycraft.console import format_number
from raycraft.rl.config import build_rl_config
from raycraft.rl.environments import make
from raycraft.rl.replay import ARRAYS_FILE
from raycraft.rl.run import (
    CHECKPOINT_ARTIFACT,
    CHECKPOINT_TAG,
    POLICY_FILE,
    algorithm_config,
    evaluate_rl,
    iteration_metrics,
    logged_policy,
    prepare,
    train_rl,
)

pytestmark = pytest.mark.slow
LEARNER_MODULE = f"{COMPONENT_LEARNER}/{COMPONENT_RL_MODULE}/{DEFAULT_MODULE_ID}"


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


def observations(env: str, n: int) -> np.ndarray:
    """First observations of `n` episodes of `env`, as float32: what the logged model takes."""
    made = make(env)
    obs = np.stack([made.reset(seed=100 + i)[0] for i in range(n)]).astype(np.float32)
    made.close()
    return obs


def served_model(uri: str, run_id: str, steps: int):
    """The run's MLflow model, loaded as `mlflow models serve` loads it, after checking that it is the run's one
    logged model and carries the metrics of the run's last iteration (at step `steps`)."""
    client = MlflowClient(uri)
    models = client.search_logged_models(experiment_ids=[client.get_run(run_id).info.experiment_id],
                                         filter_string=f"source_run_id = '{run_id}'")
    assert [m.name for m in models] == ["model"]
    assert {(m.key, m.step) for m in models[0].metrics} >= {("eval_return_mean", steps), ("env_steps", steps)}
    mlflow.set_tracking_uri(uri)
    return mlflow.pyfunc.load_model(f"runs:/{run_id}/model")


@pytest.mark.parametrize("learning_starts", [10_000, 100], ids=["sampling", "learning"])
@pytest.mark.parametrize("workers", [0, 1])
def test_epsilon_follows_the_env_steps_sampled_within_an_iteration(ray_session, storage, workers, learning_starts):
    """ε of the EnvRunner that samples decays with the env steps sampled so far, not with the count RLlib hands
    it once per iteration: after an iteration of about 400 steps, in training steps of 5 steps of 8 env copies
    (40 to 47 env steps: a copy's reset step does not count), ε = 1 − 0.98 t / 800 of a t in the last one.
    Also while learning, where a remote EnvRunner samples during the Learner's update: every step sampled
    reaches the replay (but the < n_step last ones of each unfinished episode), and the Learner learns."""
    cfg, model_cfg = build_rl_config({"algo": "dqn", "env": "CartPole-v1", "storage_path": storage, "workers": workers,
                                      "steps_per_iter": 400, "learning_starts": learning_starts, "eval_interval": 100,
                                      "dqn": {"epsilon_timesteps": 800}}, [])
    algo = algorithm_config(cfg, model_cfg, prepare(cfg, model_cfg).module_class).build_algo()
    try:
        before = {k: v.clone() for k, v in algo.get_module().state_dict().items()}
        steps = iteration_metrics(algo.train())["env_steps"]
        after = algo.get_module().state_dict()  # the local EnvRunner's
        learned = algo.learner_group.get_state(components=LEARNER_MODULE, inference_only=True)[
            COMPONENT_LEARNER][COMPONENT_RL_MODULE][DEFAULT_MODULE_ID]
        [epsilon] = algo.env_runner_group.foreach_env_runner(
            lambda runner: float(runner.module.epsilon.get_current_value()), local_env_runner=workers == 0)
        stored = len(algo.local_replay_buffer)
    finally:
        algo.stop()
    assert 400 <= steps < 450
    last, first = (1.0 - 0.98 * t / 800 for t in (steps, steps - 47))
    assert last <= epsilon <= first  # RLlib's own count gives ε of t ≤ 47: 0.94 or more
    assert steps - 8 * cfg.n_step <= stored <= steps
    assert any(not torch.equal(before[k], after[k]) for k in before) == (learning_starts < steps)
    for k, v in after.items():  # each training step ends with the Learner's weights in the EnvRunners
        assert torch.equal(v, torch.as_tensor(learned[k])), k


def test_the_algorithm_runs_no_system_usage_monitor(ray_session, storage):
    """RLlib's default starts a thread that samples CPU and memory use every 0.7 s, which nothing reads and
    whose sleep `stop()` waited for (0.7 s a run)."""
    cfg, model_cfg = build_rl_config({"algo": "ddpg", "env": "Pendulum-v1", "storage_path": storage}, [])
    algo = algorithm_config(cfg, model_cfg, prepare(cfg, model_cfg).module_class).build_algo()
    try:
        monitors = [t for t in threading.enumerate() if isinstance(t, UtilMonitor) and t.is_alive()]
    finally:
        algo.stop()
    assert monitors == []


def test_dqn_train_resume_reload_gif(ray_session, mlflow_uri, storage, tmp_path):
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
    assert {a.path for a in client.list_artifacts(first.run_id)} >= {"policy", "returns.png", "config.yaml",
                                                                      CHECKPOINT_ARTIFACT}
    assert [a.path for a in client.list_artifacts(first.run_id, "policy")] == [POLICY_FILE]

    # The logged policy, the MLflow model and the algorithm checkpoint hold the same network: identical greedy
    # actions, which the model gives as CartPole's action indices.
    logged, _ = logged_policy(mlflow_uri, first.run_id)
    saved = RLModule.from_checkpoint(f"{first.checkpoint}/learner_group/learner/rl_module/default_policy")
    obs = {Columns.OBS: torch.as_tensor(np.random.default_rng(0).normal(size=(64, 4)), dtype=torch.float32)}
    greedy = logged.forward_inference(obs)[Columns.ACTIONS]
    assert torch.equal(greedy, saved.forward_inference(obs)[Columns.ACTIONS])
    actions = served_model(mlflow_uri, first.run_id, first.env_steps).predict(obs[Columns.OBS].numpy())
    assert actions.dtype == np.int64 and actions.shape == (64,) and np.array_equal(actions, greedy.numpy())
    assert all(make("CartPole-v1").action_space.contains(a) for a in actions)

    # As on another machine: the checkpoint is only in MLflow, and --resume takes it (and its buffer) from there.
    shutil.rmtree(first.checkpoint)
    cfg, model_cfg = tiny("dqn", "CartPole-v1", storage, timesteps=400)
    second = train_rl(cfg, model_cfg, tracking_uri=mlflow_uri, resume_run_id=first.run_id)
    assert second.run_id == first.run_id
    assert client.get_run(first.run_id).data.tags[CHECKPOINT_TAG] == second.checkpoint == first.checkpoint
    assert checksums.problem(second.checkpoint, signed=True) is None
    assert second.history[0]["env_steps"] > first.env_steps  # step counters continue
    sampled_since = second.history[0]["env_steps"] - first.env_steps
    assert second.history[0]["replay_size"] > sampled_since  # the buffer came back with the checkpoint
    assert second.history[0]["iteration"] == first.iterations + 1
    assert second.env_steps >= 400
    steps = [m.value for m in client.get_metric_history(first.run_id, "env_steps")]
    assert steps == sorted(steps) and len(steps) == first.iterations + second.iterations - first.iterations
    resumed, _ = logged_policy(mlflow_uri, first.run_id)  # the run's model is now the resumed run's policy
    actions = served_model(mlflow_uri, first.run_id, second.env_steps).predict(obs[Columns.OBS].numpy())
    assert np.array_equal(actions, resumed.forward_inference(obs)[Columns.ACTIONS].numpy())

    gif = tmp_path / "episode.gif"
    returns = evaluate_rl(first.run_id, episodes=2, video=gif, tracking_uri=mlflow_uri)
    assert len(returns) == 2 and all(r >= 1 for r in returns)
    assert gif.stat().st_size > 1000
    assert "rl_eval_return_mean" in client.get_run(first.run_id).data.metrics


def test_ddpg_pendulum_through_the_cli(ray_session, tmp_path, monkeypatch, capsys):
    """`raycraft rl ddpg` through the CLI's own entry point, in this process (its Ray is the session's): its
    figures printed as `raycraft train` prints them, and its MLflow model acting in Pendulum's torque units."""
    from ray.rllib.core.columns import Columns

    from raycraft.cli import main

    keys = ["steps_per_iter=100", "learning_starts=50", "eval_episodes=1", "checkpoint_every=1", "batch_size=32",
            "training_intensity=32", "replay.prioritized=true"]  # also exercises importance weights in DDPG's loss
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["raycraft", "rl", "ddpg", "--env", "Pendulum-v1", "--timesteps", "400",
                                      "--tracking-uri", uri, *(arg for key in keys for arg in ("--set", key))])
    try:
        main(use_warm=False)
    except SystemExit as exc:
        assert exc.code == 0, exc
    out = capsys.readouterr()
    run_id = re.search(r"run id: (\w{32})", out.out).group(1)
    evals = sorted(MlflowClient(uri).get_metric_history(run_id, "eval_return_mean"), key=lambda m: m.step)
    assert evals[-1].step >= 400 and all(-2000 < m.value <= 0 for m in evals)

    lines = [line for line in out.out.splitlines() if line.startswith(("iter ", "done "))]
    assert len(lines) >= 3 and f"eval return {format_number(evals[-1].value)}  " in lines[-1], lines
    decimals = [x for line in lines for x in re.findall(r"\d+\.\d+", line)]
    assert all(len(x.replace(".", "").lstrip("0")) <= 4 for x in decimals), lines  # 4 significant digits

    batch = observations("Pendulum-v1", 16)
    actions = served_model(uri, run_id, evals[-1].step).predict(batch)
    logged, _ = logged_policy(uri, run_id)
    with torch.no_grad():
        mu = logged.forward_inference({Columns.OBS: torch.as_tensor(batch)})[Columns.ACTIONS].numpy()  # in [-1, 1]
    assert actions.dtype == np.float32 and actions.shape == (16, 1)
    np.testing.assert_allclose(actions, 2.0 * mu, rtol=1e-5, atol=1e-6)  # low + (mu + 1) / 2 (high - low)
    assert all(make("Pendulum-v1").action_space.contains(a) for a in actions)


def test_pong_nature_cnn_runs(ray_session, mlflow_uri, storage):
    cfg, model_cfg = tiny("dqn", "ALE/Pong-v5", storage, timesteps=200, batch_size=8, training_intensity=8,
                          eval_interval=1000, replay={"capacity": 1000}, steps_per_iter=100)
    assert cfg.model == "q_nature_cnn"
    out = train_rl(cfg, model_cfg, tracking_uri=mlflow_uri)
    assert out.env_steps >= 200
    assert_rates_add_up(out.history)
    mlflow.set_tracking_uri(mlflow_uri)
    taken = mlflow.models.get_model_info(f"runs:/{out.run_id}/model").signature.inputs.inputs[0]
    assert (taken.type, taken.shape) == (np.dtype("float32"), (-1, 84, 84, 4))  # preprocessed frames, as docs/rl.md
