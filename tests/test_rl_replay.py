"""raycraft's array replay: n-step rows against hand-computed returns (whole episodes and the chunks an
EnvRunner hands over), prioritised sampling and importance weights against their formulas, the
buffer's round trip through a checkpoint folder without pickle, and its frame ring against real Atari
play: every row's s and s' element by element the env's own stacked observations."""

from __future__ import annotations

import json
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import pytest
from ray.rllib.env.single_agent_episode import SingleAgentEpisode

from raycraft.errors import UserError
from raycraft.rl.environments import ATARI_FRAMES, make_atari
from raycraft.rl.replay import ARRAYS_FILE, JSON_FILE, SumTree, TransitionReplay

GAMMA = 0.9
REWARDS = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]


def chunks(cuts: list[int], terminated: bool = True) -> list[SingleAgentEpisode]:
    """One episode with observations 0..6 and REWARDS, ending terminated (else truncated), handed over
    in chunks that end after the steps in `cuts`, as `SingleAgentEnvRunner.sample` cuts ongoing episodes."""
    episode = SingleAgentEpisode(observation_space=gym.spaces.Box(-100, 100, (1,), np.float32),
                                 action_space=gym.spaces.Discrete(6))
    episode.add_env_reset(np.array([0.0], np.float32))
    out = []
    for t, r in enumerate(REWARDS):
        last = t == len(REWARDS) - 1
        episode.add_env_step(np.array([t + 1.0], np.float32), t, r, {}, terminated=last and terminated,
                             truncated=last and not terminated)
        if t + 1 in cuts and not last:
            cut = episode.cut()
            out.append(episode.to_numpy())
            episode = cut
    return [*out, episode.to_numpy()]


def hand_rows(n: int, terminated: bool) -> list[tuple[float, float, float, float, bool]]:
    """(s_t, R_t, s', m, terminated) for t = 0..5, written out from the n-step definition."""
    rows = []
    for t in range(6):
        m = min(n, 6 - t)
        ret = sum(GAMMA ** k * REWARDS[t + k] for k in range(m))
        rows.append((float(t), ret, float(t + m), float(m), terminated and t + m == 6))
    return rows


def table(buf: TransitionReplay) -> list[tuple[float, float, float, float, bool]]:
    d = buf.batch(np.arange(len(buf)))
    return sorted(zip(d["obs"][:, 0].tolist(), d["rewards"].tolist(), d["new_obs"][:, 0].tolist(),
                      d["n_step"].tolist(), d["terminateds"].tolist(), strict=True))


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("cuts", [[], [1, 2, 3, 4, 5], [2], [4]])
@pytest.mark.parametrize("terminated", [True, False])
def test_n_step_rows_match_the_definition_however_the_episode_is_chunked(n, cuts, terminated):
    buf = TransitionReplay(capacity=100, n_step=n, gamma=GAMMA, prioritized=False)
    added = sum(buf.add([c]) for c in chunks(cuts, terminated))
    assert added == len(buf) == 6
    for got, want in zip(table(buf), hand_rows(n, terminated), strict=True):
        assert got[0] == want[0] and got[2:] == want[2:]
        assert got[1] == pytest.approx(want[1], rel=1e-6)
    assert not buf.pending  # a finished episode leaves nothing behind
    np.testing.assert_array_equal(buf.rows["actions"][:6], np.arange(6))


def test_an_unfinished_episode_waits_for_the_steps_that_complete_its_windows():
    buf = TransitionReplay(capacity=100, n_step=3, gamma=GAMMA, prioritized=False)
    first, rest = chunks([4])
    assert buf.add([first]) == 2  # steps 0 and 1 have their 3 rewards; 2 and 3 wait
    assert buf.add([rest]) == 4


def test_ring_keeps_the_newest_rows():
    buf = TransitionReplay(capacity=4, n_step=1, gamma=GAMMA, prioritized=True)
    buf.add(chunks([]))
    assert len(buf) == 4
    assert sorted(buf.batch(np.arange(4))["obs"][:, 0].tolist()) == [2.0, 3.0, 4.0, 5.0]
    batch, rows = buf.sample(64)
    assert set(batch["obs"][:, 0].tolist()) <= {2.0, 3.0, 4.0, 5.0} and rows.max() < 4


def test_sum_tree_finds_the_leaf_that_holds_each_mass():
    tree = SumTree(5)  # rounded up to 8 leaves
    tree.set(np.arange(5), np.array([1.0, 0.0, 2.0, 3.0, 4.0]))
    assert tree.total == 10.0
    mass = np.array([0.0, 0.99, 1.0, 2.99, 3.0, 5.99, 6.0, 9.99])
    np.testing.assert_array_equal(tree.find(mass), [0, 0, 2, 2, 3, 3, 4, 4])


def test_prioritised_sampling_follows_p_alpha_and_weights_follow_schaul():
    alpha, beta = 0.6, 0.4
    buf = TransitionReplay(capacity=8, n_step=1, gamma=GAMMA, prioritized=True, alpha=alpha, beta=beta, seed=0)
    buf.add(chunks([]))
    td = np.array([0.5, 1.0, 2.0, 4.0, 8.0, 16.0])
    buf.update_priorities(np.arange(6), td)
    p = (td + 1e-6) ** alpha
    prob = p / p.sum()
    counts = np.zeros(6)
    for _ in range(400):
        batch, rows = buf.sample(50)
        counts += np.bincount(rows, minlength=6)
        expected_w = (prob[rows] / prob.min()) ** -beta  # (N P(i))^-β / max_k (N P(k))^-β
        np.testing.assert_allclose(batch["weights"], expected_w, rtol=1e-5)
    np.testing.assert_allclose(counts / counts.sum(), prob, atol=0.01)
    assert buf.max_priority == pytest.approx(16.0 + 1e-6)


@pytest.mark.parametrize("prioritized", [True, False])
def test_batches_drawn_at_once_are_the_batches_drawn_one_by_one(prioritized):
    """`sample(b, batches=k)` (a DQN training step's k gradient steps) is k calls of `sample(b)` from the same
    random stream: the same rows, each batch stratified over the whole priority mass, and the same weights."""
    bufs = [TransitionReplay(capacity=8, n_step=1, gamma=GAMMA, prioritized=prioritized, seed=3) for _ in range(2)]
    for buf in bufs:
        buf.add(chunks([]))
        buf.update_priorities(np.arange(6), np.array([0.5, 1.0, 2.0, 4.0, 8.0, 16.0]))
    at_once, rows = bufs[0].sample(4, batches=5)
    one_by_one = [bufs[1].sample(4) for _ in range(5)]
    np.testing.assert_array_equal(rows, np.concatenate([r for _, r in one_by_one]))
    for key in at_once:
        np.testing.assert_array_equal(at_once[key], np.concatenate([b[key] for b, _ in one_by_one]))
    if prioritized:  # stratified per batch of 4: each draws from both ends of the mass
        assert all(r[0] <= 4 and r[-1] == 5 for r in rows.reshape(5, 4))


def test_new_rows_get_the_largest_priority_seen():
    buf = TransitionReplay(capacity=16, n_step=1, gamma=GAMMA, prioritized=True, alpha=1.0)
    buf.add(chunks([]))
    buf.update_priorities(np.arange(6), np.full(6, 0.1))
    buf.update_priorities(np.array([0]), np.array([5.0]))
    buf.add(chunks([]))
    leaves = buf.tree.values(12)
    np.testing.assert_allclose(leaves[6:], 5.0 + 1e-6)


@pytest.mark.parametrize("prioritized", [True, False])
def test_round_trip_keeps_rows_priorities_and_unfinished_episodes(prioritized, tmp_path):
    saved = TransitionReplay(capacity=5, n_step=3, gamma=GAMMA, prioritized=prioritized, seed=1)
    whole, (first, rest) = chunks([]), chunks([4])
    saved.add(whole + [first])  # wraps the ring and leaves two steps pending
    saved.update_priorities(np.arange(5), np.linspace(0.1, 2.0, 5))
    saved.save(tmp_path)
    with np.load(tmp_path / ARRAYS_FILE, allow_pickle=False) as npz:
        assert all(a.dtype != object for a in npz.values())

    restored = TransitionReplay(capacity=5, n_step=3, gamma=GAMMA, prioritized=prioritized, seed=1)
    assert restored.load(tmp_path)
    assert (len(restored), restored.next, restored.max_priority) == (len(saved), saved.next, saved.max_priority)
    a, rows_a = saved.sample(32)
    b, rows_b = restored.sample(32)
    np.testing.assert_array_equal(rows_a, rows_b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert saved.add([rest]) == restored.add([rest]) == 4  # the pending steps came back too
    assert table(saved) == table(restored)


def test_loading_a_mismatched_buffer_is_a_clear_error(tmp_path):
    buf = TransitionReplay(capacity=10, n_step=1, gamma=GAMMA, prioritized=False)
    buf.add(chunks([]))
    buf.save(tmp_path)
    with pytest.raises(UserError, match="replay.prioritized"):
        TransitionReplay(capacity=10, n_step=1, gamma=GAMMA, prioritized=True).load(tmp_path)
    with pytest.raises(UserError, match="replay.capacity.*6 transitions.*capacity 4"):
        TransitionReplay(capacity=4, n_step=1, gamma=GAMMA, prioritized=False).load(tmp_path)
    assert not buf.load(tmp_path / "missing")


@dataclass
class Stream:
    """Real Atari play handed to a replay in EnvRunner-like chunks, and what each step should give back."""

    adds: list[list[SingleAgentEpisode]]  # the chunks of each `add`
    episodes: dict[int, tuple[np.ndarray, np.ndarray, bool | None]]  # step id → its episode's obs, rewards, end
    start: dict[int, int]  # step id → its index t in its episode

    def record(self, obs: list, rewards: list, ids: list[int], terminated: bool | None) -> None:
        """An episode as played (`terminated` None: unfinished), under the ids of its steps."""
        episode = (np.array(obs), np.array(rewards, np.float32), terminated)
        for t, g in enumerate(ids):
            self.episodes[g], self.start[g] = episode, t


def atari_stream(steps: int, limit: int, envs: int = 3, seed: int = 0) -> Stream:
    """`envs` Breakout games (`make_atari`: 4 stacked frames; a lost life ends an episode, `limit` steps
    truncate one) played in turn with random actions, each cut into chunks of 1 to 5 steps. Each step's action
    is recorded as its step id, so that a row names the step it starts at."""
    rng = np.random.default_rng(seed)
    games = [gym.wrappers.TimeLimit(make_atari("ALE/Breakout-v5"), limit) for _ in range(envs)]
    playing = [new_episode(game.reset(seed=seed + i)[0]) for i, game in enumerate(games)]
    stream, step = Stream([], {}, {}), 0
    while step < steps:
        stream.adds.append([])
        for i, game in enumerate(games):
            episode, obs_list, rewards, ids = playing[i]
            for _ in range(rng.integers(1, 6)):
                obs, reward, terminated, truncated, _ = game.step(int(rng.integers(game.action_space.n)))
                episode.add_env_step(obs, step, reward, terminated=terminated, truncated=truncated)
                obs_list.append(obs)
                rewards.append(reward)
                ids.append(step)
                step += 1
                if terminated or truncated:
                    break
            if episode.is_done:
                stream.record(obs_list, rewards, ids, terminated)
                playing[i] = new_episode(game.reset()[0])
            else:
                playing[i] = (episode.cut(), obs_list, rewards, ids)
            stream.adds[-1].append(episode.to_numpy())
    for _, obs_list, rewards, ids in playing:  # unfinished: rows only where n steps followed
        stream.record(obs_list, rewards, ids, None)
    return stream


def new_episode(obs: np.ndarray) -> tuple[SingleAgentEpisode, list, list, list[int]]:
    episode = SingleAgentEpisode()
    episode.add_env_reset(obs)
    return episode, [obs], [], []


def assert_rows_are_the_envs(buf: TransitionReplay, stream: Stream, index: np.ndarray) -> None:
    """Each row at `index` holds, element by element, the env's own observations s_t and s_{t+m} of the step
    its action names, with m, R_t and `terminated` of the n-step definition."""
    got = buf.batch(index)
    for i, g in enumerate(got["actions"].tolist()):
        obs, rewards, terminated = stream.episodes[g]
        t, steps = stream.start[g], len(rewards)
        m = min(buf.n_step, steps - t)
        np.testing.assert_array_equal(got["obs"][i], obs[t])
        np.testing.assert_array_equal(got["new_obs"][i], obs[t + m])
        assert got["n_step"][i] == m and got["terminateds"][i] == (bool(terminated) and t + m == steps)
        assert got["rewards"][i] == pytest.approx(sum(GAMMA ** k * rewards[t + k] for k in range(m)), rel=1e-6)


@pytest.fixture(scope="module")
def breakout() -> Stream:
    return atari_stream(steps=360, limit=40)


@pytest.mark.parametrize("n", [1, 3])
def test_frame_ring_gives_back_the_envs_stacked_observations(breakout, n, tmp_path):
    """Real Breakout, three games interleaved, episodes ended by lost lives and by the time limit, rows and
    frames wrapping their rings several times; half-way the buffer goes through a checkpoint folder and a
    larger one carries on, whose frame slots differ."""
    assert sum(1 for _, _, done in breakout.episodes.values() if done) > 10  # terminated rows are exercised
    saved = TransitionReplay(capacity=64, n_step=n, gamma=GAMMA, seed=0, frames=ATARI_FRAMES)
    half = len(breakout.adds) // 2
    for chunk in breakout.adds[:half]:
        saved.add(chunk)
    assert saved.frames_written > 2 * saved.frame_slots and saved.frames.dtype == np.uint8
    saved.save(tmp_path)
    restored = TransitionReplay(capacity=100, n_step=n, gamma=GAMMA, seed=0, frames=ATARI_FRAMES)
    assert restored.load(tmp_path) and restored.pending.keys() == saved.pending.keys()
    for buf in (saved, restored):
        for chunk in breakout.adds[half:]:
            buf.add(chunk)
        live = np.flatnonzero(buf.tree.values(buf.size))
        assert len(live) == len(buf) > 0.8 * buf.capacity
        assert_rows_are_the_envs(buf, breakout, live)
        batch, index = buf.sample(256)
        assert_rows_are_the_envs(buf, breakout, index)
        np.testing.assert_array_equal(batch["obs"], buf.batch(index)["obs"])


def test_rows_whose_frames_were_overwritten_are_never_drawn():
    """Two-step episodes write a reset frame per two rows, more than the ring's slack: the oldest rows lose
    their first frames before their turn in the row ring comes, and drop out of sampling."""
    stream = atari_stream(steps=150, limit=2, envs=2, seed=1)
    buf = TransitionReplay(capacity=40, n_step=1, gamma=GAMMA, prioritized=False, seed=0, frames=ATARI_FRAMES)
    for chunk in stream.adds:
        buf.add(chunk)
    assert buf.size == 40 and len(buf) < 40
    _, index = buf.sample(512)
    assert set(index.tolist()) == set(np.flatnonzero(buf.tree.values(buf.size)).tolist())
    assert_rows_are_the_envs(buf, stream, index)


def test_an_atari_transition_costs_a_frame():
    """The preset's 100k buffer, laid out for Pong's observations: ≤ 1/4 of the 56 KB (s and s' as uint8
    stacks) each and ≤ 1.5 GB in all; s and s' as the env's float32 stacks were 226 KB."""
    buf = TransitionReplay(capacity=100_000, n_step=1, gamma=GAMMA, frames=ATARI_FRAMES)
    episode = new_episode(make_atari("ALE/Pong-v5").reset(seed=0)[0])[0]
    episode.add_env_step(episode.get_observations(-1), 0, 0.0, terminated=True)
    buf.add([episode.to_numpy()])
    total = buf.frames.nbytes + sum(column.nbytes for column in buf.rows.values())
    assert total / buf.capacity <= 2 * 84 * 84 * 4 / 4 and total <= 1.5e9


def test_observations_that_are_not_frame_stacks_are_refused():
    with pytest.raises(ValueError, match="not stacks of 4 frames"):  # observations 0..6: no frame carries over
        TransitionReplay(capacity=10, n_step=1, gamma=GAMMA, frames=ATARI_FRAMES).add(chunks([]))
    episode = new_episode(np.full((2, 8), 0.3, np.float32))[0]  # 4 stacked 2×2 frames; 0.3 is no q/128 − 1
    episode.add_env_step(np.full((2, 8), 0.3, np.float32), 0, 0.0, terminated=True)
    with pytest.raises(ValueError, match="not uint8 images"):
        TransitionReplay(capacity=10, n_step=1, gamma=GAMMA, frames=ATARI_FRAMES).add([episode.to_numpy()])


def test_a_buffer_saved_before_frame_rings_is_refused(tmp_path):
    (tmp_path / JSON_FILE).write_text(json.dumps({"prioritized": True, "size": 1, "next": 1, "max_priority": 1.0,
                                                  "pending": []}))
    with pytest.raises(UserError, match="older raycraft"):
        TransitionReplay(capacity=10, n_step=1, gamma=GAMMA).load(tmp_path)
