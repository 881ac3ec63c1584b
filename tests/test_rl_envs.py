"""raycraft.envs and raycraft.rl.environments: the portfolio environment's dynamics and reward, Atari
preprocessing, env-id errors."""

from __future__ import annotations

import copy

import gymnasium as gym
import numpy as np
import pytest

from raycraft.envs import PORTFOLIO
from raycraft.envs.portfolio import PortfolioEnv, equal_weight_policy
from raycraft.errors import UserError
from raycraft.rl.environments import check_env, make


def test_portfolio_is_registered_with_gymnasium():
    env = gym.make(PORTFOLIO)
    assert isinstance(env.unwrapped, PortfolioEnv)
    assert env.action_space.shape == (3,) and env.observation_space.shape == (6,)


def test_portfolio_shock_covariance():
    env = PortfolioEnv(n_assets=3, sigma=0.02, rho=0.3)
    expected = 0.02 ** 2 * np.array([[1, 0.3, 0.3], [0.3, 1, 0.3], [0.3, 0.3, 1]])
    np.testing.assert_allclose(env.L @ env.L.T, expected, rtol=1e-12)


def test_portfolio_step_follows_ar1_and_reward_formula():
    env = PortfolioEnv(cost=0.01)
    obs, _ = env.reset(seed=3)
    r0, w0 = obs[:3].astype(np.float64) * env.p.sigma, obs[3:]
    np.testing.assert_allclose(w0, 1 / 3)
    rng = copy.deepcopy(env.np_random)  # the same draws the env will make
    action = np.array([0.5, -0.2, 0.1], np.float32)
    obs, reward, terminated, truncated, info = env.step(action)

    eps = rng.standard_normal(3)
    r1 = env.mu + env.p.phi * (r0 - env.mu) + env.L @ eps
    z = env.p.kappa * action.astype(np.float64)
    w = np.exp(z) / np.exp(z).sum()
    np.testing.assert_allclose(obs[:3], r1 / env.p.sigma, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(obs[3:], w, rtol=1e-6)
    want = env.p.scale * (np.log(1 + w @ r1) - 0.01 * np.abs(w - 1 / 3).sum())
    assert reward == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert not terminated and not truncated


def test_portfolio_weights_and_horizon():
    env = PortfolioEnv(horizon=7)
    env.reset(seed=0)
    np.testing.assert_allclose(env.weights(np.zeros(3)), 1 / 3)
    np.testing.assert_allclose(env.weights(np.array([1.0, -1.0, -1.0])).sum(), 1.0)
    assert env.weights(np.array([1.0, -1.0, -1.0]))[0] > 0.99  # κ = 5: near all-in
    steps, truncated = 0, False
    while not truncated:
        _, _, _, truncated, _ = env.step(equal_weight_policy(np.zeros(6)))
        steps += 1
    assert steps == 7
    assert env.render().shape == (128, 256, 3)


def test_portfolio_returns_are_predictable():
    """The AR(1) signal is what a policy can learn: next return regresses on this one with slope φ."""
    env = PortfolioEnv(phi=0.6)
    env.reset(seed=1)
    rs = [env.r.copy()]
    for _ in range(4000):
        env.step(np.zeros(3))
        rs.append(env.r.copy())
        if env.t >= env.p.horizon:
            env.t = 0
    x = np.array(rs)[:-1, 0] - env.mu[0]
    y = np.array(rs)[1:, 0] - env.mu[0]
    assert float(x @ y / (x @ x)) == pytest.approx(0.6, abs=0.05)


def test_atari_pong_preprocessing():
    env = make("ALE/Pong-v5")
    obs, _ = env.reset(seed=0)
    assert obs.shape == (84, 84, 4) and obs.dtype == np.float32
    assert obs.min() >= -1.0 and obs.max() <= 1.0
    rewards = set()
    for _ in range(300):
        nxt, reward, terminated, truncated, _ = env.step(env.action_space.sample())
        np.testing.assert_array_equal(nxt[..., :3], obs[..., 1:])  # a stack of the last 4 frames
        rewards.add(float(reward))
        obs = nxt
        if terminated or truncated:
            obs, _ = env.reset()
    assert rewards <= {-1.0, 0.0, 1.0}


def test_unknown_env_names_close_matches():
    with pytest.raises(UserError, match="'CartPole-v1'"):
        check_env("CartPol-v1")
    with pytest.raises(UserError, match="Pong"):
        check_env("ALE/Pongg-v5")
