"""Replay buffers saved without pickle: a real RLlib buffer filled with real CartPole episodes survives
the round trip (same contents, same samples), and state that JSON and .npz cannot hold is refused."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from ray.rllib.env.single_agent_episode import SingleAgentEpisode
from ray.rllib.utils.replay_buffers import EpisodeReplayBuffer, PrioritizedEpisodeReplayBuffer

from raycraft.errors import UserError
from raycraft.rl.replay_state import ARRAYS_FILE, decode, encode, load_buffer, save_buffer


def episodes(n: int, seed: int = 0) -> list[SingleAgentEpisode]:
    env = gym.make("CartPole-v1")
    out = []
    for i in range(n):
        ep = SingleAgentEpisode(observation_space=env.observation_space, action_space=env.action_space)
        obs, info = env.reset(seed=seed + i)
        ep.add_env_reset(obs, info)
        done = False
        while not done:
            action = env.action_space.sample()
            obs, reward, terminated, truncated, info = env.step(action)
            ep.add_env_step(obs, action, reward, info, terminated=terminated, truncated=truncated)
            done = terminated or truncated
        out.append(ep.to_numpy())
    return out


@pytest.mark.parametrize("kind", [EpisodeReplayBuffer, PrioritizedEpisodeReplayBuffer])
def test_buffer_round_trip_keeps_contents_and_samples(kind, tmp_path):
    saved = kind(capacity=300)  # smaller than the episodes: some are evicted, as in a long run
    for ep in episodes(20):  # one at a time, as a run adds them (RLlib evicts per call)
        saved.add([ep])
    if kind is PrioritizedEpisodeReplayBuffer:
        saved.sample(num_items=16)
        saved.update_priorities(np.linspace(0.1, 2.0, 16))
    save_buffer(saved, tmp_path)
    with np.load(tmp_path / ARRAYS_FILE, allow_pickle=False) as npz:
        assert all(a.dtype != object for a in npz.values())

    restored = kind(capacity=300)
    assert load_buffer(restored, tmp_path)
    assert len(restored) == len(saved) > 0
    assert restored.get_added_timesteps() == saved.get_added_timesteps()
    saved.rng, restored.rng = np.random.default_rng(1), np.random.default_rng(1)
    a, b = (buf.sample(num_items=32, n_step=3, gamma=0.99, sample_episodes=True) for buf in (saved, restored))
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.get_observations(), y.get_observations())
        np.testing.assert_array_equal(x.get_rewards(), y.get_rewards())


def test_codec_keeps_types_and_refuses_what_it_cannot_hold():
    state = {"a": (1, np.float32(2.5), "x"), 3: [np.arange(4), None], "__array__": np.array(["s", "t"]),
             "o": np.array([{"k": 1}, None], dtype=object)}
    arrays: list[np.ndarray] = []
    doc = encode(state, arrays)
    back = decode(doc, {f"arr_{i}": a for i, a in enumerate(arrays)})
    assert back["a"] == (1, 2.5, "x") and type(back["a"][1]) is np.float32
    np.testing.assert_array_equal(back[3][0], np.arange(4))
    assert back["__array__"].tolist() == ["s", "t"] and back["o"].tolist() == [{"k": 1}, None]
    with pytest.raises(TypeError, match="a set cannot be saved without pickle"):
        encode({"x": {1, 2}}, [])


def test_loading_into_another_kind_of_buffer_is_a_clear_error(tmp_path):
    buf = EpisodeReplayBuffer(capacity=100)
    buf.add(episodes(2))
    save_buffer(buf, tmp_path)
    with pytest.raises(UserError, match="replay.prioritized"):
        load_buffer(PrioritizedEpisodeReplayBuffer(capacity=100), tmp_path)
    assert not load_buffer(EpisodeReplayBuffer(capacity=100), tmp_path / "missing")
