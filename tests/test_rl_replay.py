"""raycraft's array replay: n-step rows against hand-computed returns (whole episodes and the chunks an
EnvRunner hands over), prioritised sampling and importance weights against their formulas, and the
buffer's round trip through a checkpoint folder without pickle."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from ray.rllib.env.single_agent_episode import SingleAgentEpisode

from raycraft.errors import UserError
from raycraft.rl.replay import ARRAYS_FILE, SumTree, TransitionReplay

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
    d = {k: v[:len(buf)] for k, v in buf.data.items()}
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
    np.testing.assert_array_equal(buf.data["actions"][:6], np.arange(6))


def test_an_unfinished_episode_waits_for_the_steps_that_complete_its_windows():
    buf = TransitionReplay(capacity=100, n_step=3, gamma=GAMMA, prioritized=False)
    first, rest = chunks([4])
    assert buf.add([first]) == 2  # steps 0 and 1 have their 3 rewards; 2 and 3 wait
    assert buf.add([rest]) == 4


def test_ring_keeps_the_newest_rows():
    buf = TransitionReplay(capacity=4, n_step=1, gamma=GAMMA, prioritized=True)
    buf.add(chunks([]))
    assert len(buf) == 4
    assert sorted(buf.data["obs"][:, 0].tolist()) == [2.0, 3.0, 4.0, 5.0]
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
