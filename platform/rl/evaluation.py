"""Greedy evaluation of an RL policy: episodes played side by side, one batched forward pass per step.

`Evaluation` scores the policy during training (`eval_interval`, `eval_episodes`): it keeps one env copy per
episode for the whole run, seeds copy i once with EVALUATION_SEED + 1000·seed + i, and lets each copy's own
generator draw every later episode, so each evaluation plays new episodes, as RLlib's evaluation EnvRunner
did, and a run with the same seed plays the same ones. It runs in the driver on the policy that the last
training step synced (no EnvRunner, no connector pipeline: on CartPole it took a fifth of the time of RLlib's
evaluation of the same episodes). `play` plays episodes from given seeds for `rl-eval`, with a GIF of the
first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from PIL import Image

from raycraft.rl import modules
from raycraft.rl.environments import make

EVALUATION_SEED = 20_000
"""Seeds of the training-time evaluation's env copies start here: apart from the training envs' (RLlib's,
from `seed`) and from `rl-eval`'s (10,000 on)."""


@torch.no_grad()
def side_by_side(policy: modules.GreedyPolicy, envs: list[gym.Env], seeds: list[int | None],
                 frames: list[Image.Image] | None = None) -> list[float]:
    """The return of one greedy episode in each env, reset with its seed (None: its generator's next), all
    stepped together; each step's frame of envs[0]'s episode goes to `frames` if given."""
    obs = [env.reset(seed=seed)[0] for env, seed in zip(envs, seeds, strict=True)]
    returns, playing = [0.0] * len(envs), list(range(len(envs)))
    while playing:
        if frames is not None and playing[0] == 0:
            frames.append(Image.fromarray(envs[0].render()))
        actions = policy(torch.as_tensor(np.stack([obs[i] for i in playing]), dtype=torch.float32)).numpy()
        still = []
        for i, action in zip(playing, actions, strict=True):
            obs[i], reward, terminated, truncated, _ = envs[i].step(action)
            returns[i] += float(reward)
            if not (terminated or truncated):
                still.append(i)
        playing = still
    return returns


class Evaluation:
    """The greedy policy's returns over `episodes` new episodes per call (the module docstring)."""

    def __init__(self, env_name: str, env_config: dict[str, Any], episodes: int, seed: int) -> None:
        self.envs = [make(env_name, env_config) for _ in range(episodes)]
        self.seeds: list[int | None] = [EVALUATION_SEED + 1000 * seed + i for i in range(episodes)]

    def __call__(self, module) -> list[float]:
        returns = side_by_side(modules.GreedyPolicy(module), self.envs, self.seeds)
        self.seeds = [None] * len(self.envs)
        return returns

    def close(self) -> None:
        for env in self.envs:
            env.close()


def play(module, env_name: str, env_config: dict, episodes: int, seed: int = 0,
         gif: Path | None = None) -> list[float]:
    """Returns of `episodes` greedy episodes from seeds seed, seed + 1, ...; frames of the first go to `gif`."""
    envs = [make(env_name, env_config, render_mode="rgb_array" if gif and i == 0 else None) for i in range(episodes)]
    frames: list[Image.Image] | None = [] if gif else None
    try:
        returns = side_by_side(modules.GreedyPolicy(module), envs, [seed + i for i in range(episodes)], frames)
    finally:
        for env in envs:
            env.close()
    if gif and frames:
        frames[0].save(gif, save_all=True, append_images=frames[1::2], duration=40, loop=0)
    return returns
