"""The greedy evaluation plays its episodes side by side exactly as one at a time, and each evaluation of a
run plays new episodes, the same ones for the same seed (Pendulum: a return is a float, so two episodes
from different start states never tie)."""

from __future__ import annotations

import gymnasium as gym
import pytest
import torch

from raycraft.rl import modules
from raycraft.rl.config import build_rl_config
from raycraft.rl.evaluation import Evaluation, play
from raycraft.rl.run import inference_module, prepare

ENV = "Pendulum-v1"


@pytest.fixture(scope="module")
def module():
    cfg, model_cfg = build_rl_config({"algo": "ddpg", "env": ENV, "seed": 0}, [])
    return inference_module(cfg, model_cfg, prepare(cfg, model_cfg))


def one_at_a_time(module, seeds: list[int]) -> list[float]:
    policy, env, returns = modules.GreedyPolicy(module), gym.make(ENV), []
    for seed in seeds:
        obs, _ = env.reset(seed=seed)
        total, done = 0.0, False
        while not done:
            with torch.no_grad():
                action = policy(torch.as_tensor(obs[None], dtype=torch.float32))[0].numpy()
            obs, reward, terminated, truncated, _ = env.step(action)
            total, done = total + float(reward), terminated or truncated
        returns.append(total)
    return returns


def test_episodes_side_by_side_return_what_they_return_one_at_a_time(module):
    assert play(module, ENV, {}, episodes=3, seed=7) == pytest.approx(one_at_a_time(module, [7, 8, 9]), rel=1e-5)


def test_each_evaluation_plays_new_episodes_and_a_run_s_seed_fixes_them(module):
    first, again, other = Evaluation(ENV, {}, 3, seed=0), Evaluation(ENV, {}, 3, seed=0), Evaluation(ENV, {}, 3, seed=1)
    try:
        returns = [first(module), first(module)]
        assert [again(module), again(module)] == returns
        assert set(returns[0]).isdisjoint(returns[1])
        assert set(other(module)).isdisjoint(returns[0])
    finally:
        for evaluation in (first, again, other):
            evaluation.close()
