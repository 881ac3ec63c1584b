"""Driver of `raycraft rl` and `raycraft rl-eval`: validate, build the RLlib algorithm, train with
progress, checkpoint, log to MLflow; reload a logged policy and play it.

MLflow holds, per run: the config (params and config.yaml), per-iteration metrics at step = env steps
(return_mean, eval_return_mean, steps_per_s, ...), `returns.png`, the final policy as an RLModule
checkpoint under `policy/`, and the tag `raycraft.checkpoint` (the last full algorithm checkpoint, for
`--resume`). Everything the user can get wrong is checked in `prepare` before Ray starts.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raycraft.config import flatten, to_dict
from raycraft.errors import UserError
from raycraft.rl.config import RLConfig

CHECKPOINT_TAG = "raycraft.checkpoint"
# What each training iteration logs (eval_return_mean on evaluation iterations, return_mean once an
# episode has ended).
ITERATION_METRICS = ("iteration", "env_steps", "return_mean", "episode_len_mean", "eval_return_mean",
                     "steps_per_s", "wall_s", "replay_size")


@dataclass
class Prepared:
    """What `prepare` found out about a job before Ray starts."""

    module_class: type
    observation_space: Any
    action_space: Any


@dataclass
class RLOutcome:
    run_id: str
    env_steps: int
    iterations: int
    eval_return: float | None
    wall_s: float
    checkpoint: str
    history: list[dict[str, float]] = field(default_factory=list)


def learner_class(algo: str) -> type:
    if algo == "dqn":
        from ray.rllib.algorithms.dqn.torch.dqn_torch_learner import DQNTorchLearner

        return DQNTorchLearner
    from raycraft.rl.ddpg import DDPGTorchLearner

    return DDPGTorchLearner


def prepare(cfg: RLConfig, model_cfg: Any) -> Prepared:
    """Env id, action space against the algorithm, model class against the learner's required APIs."""
    import gymnasium as gym

    from raycraft.envs import check_env, make
    from raycraft.registry import create_model, model_spec, models

    check_env(cfg.env)
    env = make(cfg.env, cfg.env_config)
    obs_space, act_space = env.observation_space, env.action_space
    env.close()
    if cfg.algo == "dqn" and not isinstance(act_space, gym.spaces.Discrete):
        raise UserError(f"--env: DQN picks one of finitely many actions, but {cfg.env!r} has a continuous action "
                        f"space {act_space}. Use `raycraft rl ddpg --env {cfg.env}`.")
    if cfg.algo == "ddpg" and not isinstance(act_space, gym.spaces.Box):
        raise UserError(f"--env: DDPG needs a continuous (Box) action space, but {cfg.env!r} has {act_space}. "
                        f"Use `raycraft rl dqn --env {cfg.env}`.")
    required = learner_class(cfg.algo).rl_module_required_apis()
    fits = ", ".join(sorted(n for n, s in models().items() if s.recipe.get("algo") == cfg.algo))
    made_for = model_spec(cfg.model).recipe.get("algo", cfg.algo)
    if made_for != cfg.algo:
        raise UserError(f"--model: {cfg.model!r} is a {made_for.upper()} model; it lacks "
                        f"{', '.join(api.__name__ for api in required)}, which {cfg.algo.upper()}'s learner "
                        f"needs. Models for {cfg.algo}: {fits}.")
    module = create_model(cfg.model, model_cfg, {"observation_space": obs_space, "action_space": act_space})
    missing = [api.__name__ for api in required if not isinstance(module, api)]
    if missing:
        raise UserError(f"--model: {cfg.model!r} ({type(module).__name__}) lacks {', '.join(missing)}, which "
                        f"{cfg.algo.upper()}'s learner needs. Models for {cfg.algo}: {fits}.")
    return Prepared(type(module), obs_space, act_space)


def algorithm_config(cfg: RLConfig, model_cfg: Any, module_class: type):
    """The RLlib AlgorithmConfig (new API stack) for this job."""
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from raycraft.envs import rllib_env
    from raycraft.rl.ddpg import DDPGConfig
    from raycraft.rl.dqn import DQNConfig

    replay = ({"type": "PrioritizedEpisodeReplayBuffer", "capacity": cfg.replay.capacity,
               "alpha": cfg.replay.alpha, "beta": cfg.replay.beta} if cfg.replay.prioritized
              else {"type": "EpisodeReplayBuffer", "capacity": cfg.replay.capacity})
    common = {"gamma": cfg.gamma, "train_batch_size_per_learner": cfg.batch_size, "n_step": cfg.n_step,
              "num_steps_sampled_before_learning_starts": cfg.learning_starts,
              "training_intensity": cfg.training_intensity, "grad_clip": cfg.grad_clip,
              "replay_buffer_config": replay}
    if cfg.algo == "dqn":
        d = cfg.dqn
        config = DQNConfig().training(
            **common, lr=cfg.lr, double_q=model_cfg.double_q, dueling=model_cfg.dueling,
            epsilon=[(0, d.epsilon_initial), (d.epsilon_timesteps, d.epsilon_final)],
            target_network_update_freq=d.target_update_freq, tau=1.0, td_error_loss_fn=d.td_loss)
    else:
        d = cfg.ddpg
        config = DDPGConfig().training(**common, actor_lr=d.actor_lr, critic_lr=d.critic_lr, tau=d.tau,
                                       noise=d.noise, noise_sigma=d.noise_sigma, ou_theta=d.ou_theta)
    return (config
            .environment(env=rllib_env(cfg.env), env_config=dict(cfg.env_config))
            .framework("torch")
            .env_runners(num_env_runners=cfg.workers, num_envs_per_env_runner=cfg.envs_per_worker)
            .learners(num_learners=0)
            .rl_module(rl_module_spec=RLModuleSpec(module_class=module_class, model_config=to_dict(model_cfg)))
            .reporting(min_sample_timesteps_per_iteration=cfg.steps_per_iter, min_time_s_per_iteration=0)
            .evaluation(evaluation_interval=cfg.eval_interval, evaluation_duration=cfg.eval_episodes,
                        evaluation_duration_unit="episodes", evaluation_num_env_runners=0)
            .debugging(seed=cfg.seed, log_level="ERROR"))


def iteration_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The numbers raycraft shows and logs from one `Algorithm.train()` result."""
    from ray.rllib.utils.metrics import (
        ENV_RUNNER_RESULTS,
        EPISODE_LEN_MEAN,
        EPISODE_RETURN_MEAN,
        EVALUATION_RESULTS,
        NUM_ENV_STEPS_SAMPLED_LIFETIME,
    )

    runners = result.get(ENV_RUNNER_RESULTS, {})
    out = {"iteration": float(result["training_iteration"]),
           "env_steps": float(runners.get(NUM_ENV_STEPS_SAMPLED_LIFETIME, 0))}
    for key, value in (("return_mean", runners.get(EPISODE_RETURN_MEAN)),
                       ("episode_len_mean", runners.get(EPISODE_LEN_MEAN)),
                       ("eval_return_mean",
                        result.get(EVALUATION_RESULTS, {}).get(ENV_RUNNER_RESULTS, {}).get(EPISODE_RETURN_MEAN))):
        if value is not None and value == value:  # NaN before the first finished episode
            out[key] = float(value)
    return out


def save_checkpoint(algo, path: Path, with_buffer: bool = False) -> None:
    """Write the whole algorithm (modules, optimizers, step counters) to `path`, replacing it atomically;
    with `with_buffer`, also the replay buffer's contents (`TransitionReplay.save`: no pickle)."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    algo.save_to_path(str(tmp))
    if with_buffer:
        algo.local_replay_buffer.save(tmp)
    old = path.with_name(path.name + ".old")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def restore_checkpoint(algo, path: Path) -> None:
    """The algorithm's state, and the replay buffer where the checkpoint holds one."""
    algo.restore_from_path(str(path))
    algo.local_replay_buffer.load(path)


def returns_png(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in (("return_mean", "training episodes"), ("eval_return_mean", "evaluation (greedy)")):
        pts = [(h["env_steps"], h[key]) for h in history if key in h]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", ms=2, label=label)
    ax.set_xlabel("env steps")
    ax.set_ylabel("episode return")
    ax.grid(alpha=0.3)
    if ax.lines:  # no finished episode yet in a very short run
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train_rl(cfg: RLConfig, model_cfg: Any, *, tracking_uri: str | None = None, address: str | None = None,
             resume_run_id: str | None = None, on_start: Callable[[str], None] | None = None,
             on_iteration: Callable[[dict[str, float]], None] | None = None, run_name: str | None = None,
             tags: dict[str, str] | None = None) -> RLOutcome:
    """Train until `cfg.reached`, logging each iteration to MLflow; `run_name` and `tags` name a new run."""
    from mlflow.entities import Metric

    from raycraft import tracking
    from raycraft.rl.ddpg import register
    from raycraft.runner import init_ray

    prepared = prepare(cfg, model_cfg)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    if resume_run_id:
        run_id = resume_run_id
        checkpoint = tracking.get_run(uri, run_id).data.tags.get(CHECKPOINT_TAG)
        if not checkpoint or not Path(checkpoint).is_dir():
            raise UserError(f"--resume: run {run_id!r} has no checkpoint on this machine ({checkpoint!r}).")
        checkpoint_dir = Path(checkpoint)
        tracking.reopen_run(uri, run_id)
    else:
        name = run_name or f"{cfg.algo}-{cfg.env.replace('/', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_id = tracking.start_run(uri, cfg.experiment, name, flatten(to_dict(cfg)),
                                    {"raycraft.model": cfg.model, "raycraft.env": cfg.env,
                                     "raycraft.algo": cfg.algo, "raycraft.task": "rl", **(tags or {})},
                                    yaml.safe_dump({**to_dict(cfg), "model_args": to_dict(model_cfg)},
                                                   sort_keys=False))
        checkpoint_dir = (Path(cfg.storage_path) / f"raycraft-rl-{run_id}" / "checkpoint").resolve()
        checkpoint_dir.parent.mkdir(parents=True, exist_ok=True)
        tracking.set_tags(uri, run_id, {CHECKPOINT_TAG: str(checkpoint_dir)})
    if on_start:
        on_start(run_id)

    client = tracking._client(uri)
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    algo = None
    try:
        init_ray(address)
        register()
        algo = algorithm_config(cfg, model_cfg, prepared.module_class).build_algo()
        if resume_run_id:
            restore_checkpoint(algo, checkpoint_dir)
        steps, last_t, m = 0.0, time.perf_counter(), {}
        while True:
            m = iteration_metrics(algo.train())
            now = time.perf_counter()
            m["steps_per_s"] = (m["env_steps"] - steps) / max(now - last_t, 1e-9)
            m["wall_s"] = now - start
            m["replay_size"] = float(len(algo.local_replay_buffer))
            steps, last_t = m["env_steps"], now
            history.append(m)
            stamp = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, v, stamp, int(m["env_steps"])) for k, v in m.items()])
            if on_iteration:
                on_iteration(m)
            done = cfg.reached(m)
            if done or int(m["iteration"]) % cfg.checkpoint_every == 0:
                save_checkpoint(algo, checkpoint_dir, cfg.replay.save_in_checkpoint)
            if done:
                break
        with tempfile.TemporaryDirectory() as tmp:
            algo.get_module().save_to_path(str(Path(tmp) / "policy"))
            returns_png(history, Path(tmp) / "returns.png")
            client.log_artifacts(run_id, str(Path(tmp) / "policy"), "policy")
            client.log_artifact(run_id, str(Path(tmp) / "returns.png"))
    except BaseException as exc:
        if tracking.get_run(uri, run_id).info.status == "RUNNING":  # a sweep may have ended it (KILLED) first
            tracking.end_run(uri, run_id, "FAILED", f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if algo is not None:
            algo.stop()
    tracking.end_run(uri, run_id, "FINISHED")
    return RLOutcome(run_id, int(m["env_steps"]), int(m["iteration"]), m.get("eval_return_mean"),
                     time.perf_counter() - start, str(checkpoint_dir), history)


def policy_actions(module, obs, action_space):
    """Greedy actions of an RLModule for a batch of observations, in the env's own action units."""
    import gymnasium as gym
    import numpy as np
    import torch
    from ray.rllib.core.columns import Columns

    with torch.no_grad():
        out = module.forward_inference({Columns.OBS: torch.as_tensor(np.asarray(obs), dtype=torch.float32)})
    actions = out[Columns.ACTIONS].cpu().numpy()
    if isinstance(action_space, gym.spaces.Box):  # [−1, 1] → [low, high], as RLlib's connector does
        actions = action_space.low + (actions + 1.0) * 0.5 * (action_space.high - action_space.low)
    return actions


def play(module, env_name: str, env_config: dict, episodes: int, seed: int = 0,
         gif: Path | None = None) -> list[float]:
    """Returns of `episodes` greedy episodes; frames of the first go to `gif` if given."""
    from PIL import Image

    from raycraft.envs import make

    env = make(env_name, env_config, render_mode="rgb_array" if gif else None)
    returns, frames = [], []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        total, done = 0.0, False
        while not done:
            if gif and ep == 0:
                frames.append(Image.fromarray(env.render()))
            action = policy_actions(module, obs[None], env.action_space)[0]
            obs, reward, terminated, truncated, _ = env.step(action)
            total, done = total + float(reward), terminated or truncated
        returns.append(total)
    env.close()
    if gif and frames:
        frames[0].save(gif, save_all=True, append_images=frames[1::2], duration=40, loop=0)
    return returns


def evaluate_rl(run_id: str, *, episodes: int = 10, video: Path | None = None,
                tracking_uri: str | None = None) -> list[float]:
    """Reload RUN_ID's logged policy (an RLModule checkpoint in MLflow), play it, log the result."""
    import torch
    from ray.rllib.core.rl_module.rl_module import RLModule

    from raycraft import tracking

    torch.set_num_threads(1)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    run = tracking.get_run(uri, run_id)
    if run.data.tags.get("raycraft.task") != "rl":
        raise UserError(f"RUN_ID: run {run_id!r} is not a `raycraft rl` run; use `raycraft eval` for it.")
    if episodes < 1:
        raise UserError(f"--episodes: must be at least 1, got {episodes}.")
    cfg = yaml.safe_load(tracking.download_text(uri, run_id, "config.yaml"))
    client = tracking._client(uri)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, "policy", tmp)
        except Exception:
            raise UserError(f"RUN_ID: run {run_id!r} has no logged policy (did it finish?).") from None
        module = RLModule.from_checkpoint(local)
    returns = play(module, cfg["env"], cfg.get("env_config") or {}, episodes, seed=10_000, gif=video)
    from mlflow.entities import Metric

    mean = sum(returns) / len(returns)
    client.log_batch(run_id, metrics=[Metric("rl_eval_return_mean", mean, int(time.time() * 1000), 0)])
    if video:
        client.log_artifact(run_id, str(video))
    return returns
