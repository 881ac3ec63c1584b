"""Every environment `raycraft rl` can train on, by name, and its registration with RLlib.

`make(name, env_config)` builds raycraft's own environments (`raycraft/Portfolio-v0`, from
`raycraft.envs`), Atari games (`ALE/Pong-v5`, ...) with the standard DQN preprocessing, and every
gymnasium id. `check_env(name)` turns an unknown name into a UserError with the closest ids, before Ray
starts; `rllib_env(name)` registers the creator with RLlib (Tune's registry, shared with its EnvRunner
processes) and returns the name to put in `config.environment(env=...)`.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import ale_py
import gymnasium as gym
import numpy as np
from ray.rllib.env.wrappers.atari_wrappers import wrap_atari_for_new_api_stack
from ray.tune.registry import register_env

from raycraft.envs import ATARI_PREFIX, PORTFOLIO
from raycraft.errors import UserError, closest
from raycraft.rl.replay import FrameFormat

gym.register_envs(ale_py)  # the ALE/ games, on the driver and on every process that unpickles `_create`
# Frames drawn into arrays need no sound card and no display: without these, pygame's init (gymnasium's classic
# control envs draw with it) probes both and a headless machine prints ALSA's "cannot find card" lines and SDL's
# "XDG_RUNTIME_DIR is invalid". Set only where the user has not chosen a driver.
OFFSCREEN_SDL = {"SDL_AUDIODRIVER": "dummy", "SDL_VIDEODRIVER": "dummy"}

ATARI_FRAMES = FrameFormat(stack=4, scale=1 / 128, offset=-1.0)
"""`make_atari`'s observations: 4 stacked 84×84 frames, each a uint8 image q seen as q/128 − 1."""


def make_atari(name: str, env_config: dict[str, Any] | None = None, render_mode: str | None = None) -> gym.Env:
    """An Atari game with the DQN preprocessing of Mnih et al. (2015), from RLlib's and gymnasium's wrappers:
    30 no-op resets, frame skip 4 with a max over the last two frames, grayscale 84×84 scaled to [−1, 1],
    a stack of 4 frames, a life loss ends the episode, FIRE on reset, rewards clipped to their sign."""
    cfg = dict(env_config or {})
    env = gym.make(name, frameskip=1, render_mode=render_mode, **cfg)  # the wrapper skips frames itself
    env = wrap_atari_for_new_api_stack(env, dim=84, frameskip=4, framestack=ATARI_FRAMES.stack)
    return gym.wrappers.TransformReward(env, np.sign)


def make(name: str, env_config: dict[str, Any] | None = None, render_mode: str | None = None) -> gym.Env:
    if render_mode == "rgb_array":
        for key, value in OFFSCREEN_SDL.items():
            os.environ.setdefault(key, value)  # read when pygame first initialises SDL, at the first render
    cfg = {k: v for k, v in dict(env_config or {}).items() if k != "num_envs"}  # RLlib adds num_envs
    if name.startswith(ATARI_PREFIX):
        return make_atari(name, cfg, render_mode)
    check_env(name)
    return gym.make(name, render_mode=render_mode, **cfg)


def frame_format(name: str) -> FrameFormat:
    """What the replay stores of `name`'s observations: Atari's frames, once each as uint8; any other
    observation once, as the env gives it."""
    return ATARI_FRAMES if name.startswith(ATARI_PREFIX) else FrameFormat()


def check_env(name: str) -> None:
    """UserError naming the closest known ids when `name` is neither a gymnasium id nor an Atari game."""
    if name in gym.registry:
        return
    near = closest(name, list(gym.registry), n=5)
    hint = f" Did you mean {', '.join(repr(c) for c in near)}?" if near else ""
    raise UserError(f"--env: {name!r} is not a registered environment.{hint} Any gymnasium id works "
                    f"(CartPole-v1, Pendulum-v1, {PORTFOLIO}, ALE/Pong-v5, ...).")


def _create(name: str, env_config: dict[str, Any]) -> gym.Env:
    return make(name, dict(env_config))


def rllib_env(name: str) -> str:
    check_env(name)
    register_env(name, functools.partial(_create, name))
    return name
