"""Stable-Baselines3 with RL Zoo's tuned hyperparameters: the peer that rl_cartpole.py and rl_pendulum.py
measure raycraft against, in the same process and under the same evaluation protocol (the greedy policy's
mean return over `eval_episodes` episodes after every `eval_every` env steps, until it reaches the target).

SB3 is a benchmark-only dependency: `pip install -c constraints.txt -e ".[bench]"`.
"""

from __future__ import annotations

import time

import numpy as np
from rl_results import Result
from stable_baselines3 import DDPG, DQN
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.noise import NormalActionNoise

# rl-baselines3-zoo, hyperparams/dqn.yml, CartPole-v1 ("Almost Tuned"; n_timesteps 5e4). The ε schedule
# decays over exploration_fraction × n_timesteps = 8000 steps whatever the run's length (see `_dqn`).
ZOO_DQN_CARTPOLE = {"learning_rate": 2.3e-3, "batch_size": 64, "buffer_size": 100_000, "learning_starts": 1000,
                    "gamma": 0.99, "target_update_interval": 10, "train_freq": 256, "gradient_steps": 128,
                    "exploration_fraction": 0.16, "exploration_final_eps": 0.04,
                    "policy_kwargs": {"net_arch": [256, 256]}}
ZOO_DQN_CARTPOLE_TIMESTEPS = 50_000
# rl-baselines3-zoo, hyperparams/ddpg.yml, Pendulum-v1 (noise_type normal, noise_std 0.1; SB3's DDPG
# defaults for the rest: batch 256, τ 0.005).
ZOO_DDPG_PENDULUM = {"gamma": 0.98, "buffer_size": 200_000, "learning_starts": 10_000, "train_freq": 1,
                     "gradient_steps": 1, "learning_rate": 1e-3, "policy_kwargs": {"net_arch": [400, 300]}}
ZOO_DDPG_NOISE_STD = 0.1


class EvalUntil(BaseCallback):
    """Evaluate the greedy policy every `every` env steps on `episodes` envs at once (one episode each);
    stop training once the mean return reaches `target`."""

    def __init__(self, env_id: str, seed: int, every: int, episodes: int, target: float) -> None:
        super().__init__()
        self.every, self.episodes, self.target = every, episodes, target
        self.env = make_vec_env(env_id, n_envs=episodes, seed=10_000 + seed)
        self.best = float("-inf")

    def _on_step(self) -> bool:
        if self.num_timesteps % self.every:
            return True
        mean, _ = evaluate_policy(self.model, self.env, n_eval_episodes=self.episodes, deterministic=True)
        self.best = max(self.best, float(mean))
        return self.best < self.target


def _dqn(env_id: str, seed: int, max_steps: int) -> DQN:
    kwargs = dict(ZOO_DQN_CARTPOLE)
    kwargs["exploration_fraction"] *= ZOO_DQN_CARTPOLE_TIMESTEPS / max_steps  # SB3 scales it by learn()'s length
    return DQN("MlpPolicy", env_id, seed=seed, device="cpu", **kwargs)


def _ddpg(env_id: str, seed: int, max_steps: int) -> DDPG:
    noise = NormalActionNoise(np.zeros(1), ZOO_DDPG_NOISE_STD * np.ones(1))
    return DDPG("MlpPolicy", env_id, seed=seed, device="cpu", action_noise=noise, **ZOO_DDPG_PENDULUM)


ALGOS = {"dqn": _dqn, "ddpg": _ddpg}


def run_sb3(algo: str, env_id: str, seed: int, *, max_steps: int, eval_every: int, eval_episodes: int,
            target: float) -> Result:
    """Train SB3's `algo` with the zoo's settings until the evaluation reaches `target` or `max_steps`."""
    start = time.perf_counter()
    model = ALGOS[algo](env_id, seed, max_steps)
    until = EvalUntil(env_id, seed, eval_every, eval_episodes, target)
    model.learn(total_timesteps=max_steps, callback=until)
    return Result(float(model.num_timesteps), time.perf_counter() - start, until.best)
