"""Experience replay as flat numpy arrays: n-step transitions in a ring buffer, uniform or prioritised.

RLlib's episode replay buffers keep whole episodes and cut an n-step transition out of one for every
item of every batch (a `SingleAgentEpisode` each), which its learner connectors then turn back into
columns: on CartPole that per-item Python work was most of a DQN step. Here each env step becomes one
row when it is added, and a batch is a few array gathers.

n-step transition from step t of an episode, cut short by the episode's end (Sutton & Barto, 7.1):

    R_t = Σ_{k=0}^{m-1} γ^k r_{t+k},   s' = s_{t+m},   m = min(n, T − t)

`terminated` is set only when the window reaches a terminal state; a truncated episode (time limit)
bootstraps from its last observation. The learner's target is R_t + γ^m (1 − terminated) max_a' Q(s', a').

Prioritised replay (Schaul et al., 2016): row i is drawn with probability P(i) = p_i^α / Σ_k p_k^α,
p_i = |δ_i| + ε (new rows get the largest p seen so far), and weighted by w_i = (N P(i))^{-β} / max_k w_k.
A sum tree over p^α finds B stratified draws in log2(capacity) vectorised steps.

Observations are stored twice (s and s'), the price of a gather-only batch: size `capacity` with that
in mind for image observations (Atari 84×84×4: about 56 KB per row).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from raycraft.errors import UserError

EPS = 1e-6
"""ε of p_i = |δ_i| + ε: keeps every row drawable."""
JSON_FILE = "replay_buffer.json"
ARRAYS_FILE = "replay_buffer.npz"


class SumTree:
    """Σ over a power-of-two array of leaves, updated and searched for a whole batch at once."""

    def __init__(self, capacity: int) -> None:
        self.leaves = 1 << max(int(capacity - 1).bit_length(), 0)
        self.tree = np.zeros(2 * self.leaves)

    @property
    def total(self) -> float:
        return float(self.tree[1])

    def values(self, n: int) -> np.ndarray:
        """The first n leaves (a view)."""
        return self.tree[self.leaves:self.leaves + n]

    def set(self, index: np.ndarray, value: np.ndarray) -> None:
        node = np.asarray(index) + self.leaves
        self.tree[node] = value
        while len(node) and node[0] > 1:
            node = np.unique(node // 2)
            self.tree[node] = self.tree[2 * node] + self.tree[2 * node + 1]

    def find(self, mass: np.ndarray) -> np.ndarray:
        """For each u in `mass` (0 ≤ u < total), the leaf i with Σ_{k<i} leaf_k ≤ u < Σ_{k≤i} leaf_k."""
        node = np.ones(len(mass), dtype=np.int64)
        mass = mass.copy()
        while node[0] < self.leaves:
            left = self.tree[2 * node]
            right = mass >= left
            mass -= left * right
            node = 2 * node + right
        return node - self.leaves


class TransitionReplay:
    """Ring buffer of n-step transitions fed by RLlib episode chunks, sampled as one dict of arrays."""

    def __init__(self, capacity: int, n_step: int, gamma: float, prioritized: bool = True, alpha: float = 0.6,
                 beta: float = 0.4, seed: int | None = None) -> None:
        self.capacity, self.n_step, self.gamma = capacity, n_step, gamma
        self.prioritized, self.alpha, self.beta = prioritized, alpha, beta
        self.rng = np.random.default_rng(seed)
        self.data: dict[str, np.ndarray] = {}
        self.size = self.next = 0
        self.max_priority = 1.0
        self.tree = SumTree(capacity) if prioritized else None
        # Per unfinished episode: its last < n steps, whose n-step windows the next chunk completes.
        self.pending: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.size

    def add(self, episodes: list[Any]) -> int:
        """Turn RLlib `SingleAgentEpisode` chunks into rows; returns how many rows were added."""
        added = 0
        for episode in episodes:
            actions = np.asarray(episode.get_actions())
            if len(actions) == 0:
                continue
            obs, rewards = np.asarray(episode.get_observations()), np.asarray(episode.get_rewards(), np.float32)
            if episode.id_ in self.pending:  # its last observation is this chunk's first
                p_obs, p_actions, p_rewards = self.pending.pop(episode.id_)
                obs = np.concatenate([p_obs[:-1], obs])
                actions, rewards = np.concatenate([p_actions, actions]), np.concatenate([p_rewards, rewards])
            done = episode.is_terminated or episode.is_truncated
            rows = self._n_step_rows(obs, actions, rewards, done, episode.is_terminated)
            if not done:
                keep = len(actions) - len(rows["actions"])
                if keep:
                    self.pending[episode.id_] = (obs[-keep - 1:], actions[-keep:], rewards[-keep:])
            added += self._write(rows)
        return added

    def _n_step_rows(self, obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray, done: bool,
                     terminated: bool) -> dict[str, np.ndarray]:
        """Rows for every step t whose window is complete: t + n ≤ T, or any t once the episode is done."""
        steps = len(actions)
        t = np.arange(steps if done else max(steps - self.n_step + 1, 0))
        end = np.minimum(t + self.n_step, steps)  # t + m
        ret = np.zeros(len(t), np.float32)
        for k in range(self.n_step):
            inside = t + k < end
            ret += inside * self.gamma ** k * rewards[np.minimum(t + k, steps - 1)]
        return {"obs": obs[t], "actions": actions[t], "rewards": ret, "new_obs": obs[end],
                "terminateds": terminated & (end == steps), "n_step": (end - t).astype(np.float32)}

    def _write(self, rows: dict[str, np.ndarray]) -> int:
        count = len(rows["actions"])
        if not count:
            return 0
        if not self.data:
            self.data = {k: self._column_like(v) for k, v in rows.items()}
        if count > self.capacity:
            rows = {k: v[-self.capacity:] for k, v in rows.items()}
        index = (self.next + np.arange(len(rows["actions"]))) % self.capacity
        for key, value in rows.items():
            self.data[key][index] = value
        if self.tree is not None:
            self.tree.set(index, np.full(len(index), self.max_priority ** self.alpha))
        self.next = int(index[-1] + 1) % self.capacity
        self.size = min(self.size + len(index), self.capacity)
        return count

    def _column_like(self, rows: np.ndarray) -> np.ndarray:
        """An empty column of `capacity` rows shaped and typed like `rows`."""
        return np.zeros((self.capacity, *rows.shape[1:]), rows.dtype)

    def sample(self, batch_size: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """(batch, row indices). The batch's columns are RLlib's names: obs, actions, rewards (R_t), new_obs (s'),
        terminateds, n_step (m), and the importance weights `weights` (all 1 for uniform replay)."""
        if not self.size:
            raise ValueError("replay: sample() before any transition was added")
        if self.tree is None:
            index = self.rng.integers(0, self.size, batch_size)
            weights = np.ones(batch_size, np.float32)
        else:
            total = self.tree.total
            mass = (np.arange(batch_size) + self.rng.random(batch_size)) * (total / batch_size)
            index = np.minimum(self.tree.find(np.minimum(mass, np.nextafter(total, 0))), self.size - 1)
            leaf = self.tree.values(self.size)
            prob, p_min = leaf[index] / total, leaf.min() / total
            weights = ((prob / p_min) ** -self.beta).astype(np.float32)  # (N P(i))^-β / (N P_min)^-β
        batch = {key: value[index] for key, value in self.data.items()}
        batch["weights"] = weights
        return batch, index

    def update_priorities(self, index: np.ndarray, td_error: np.ndarray) -> None:
        """p_i = |δ_i| + ε for the rows of the last batch (a row drawn twice keeps its last δ)."""
        if self.tree is None:
            return
        priority = np.abs(np.asarray(td_error, np.float64)) + EPS
        self.max_priority = max(self.max_priority, float(priority.max()))
        self.tree.set(index, priority ** self.alpha)

    def save(self, folder: Path) -> None:
        """Write the contents into `folder`: arrays in replay_buffer.npz, numbers in replay_buffer.json."""
        arrays = {f"data.{k}": v[:self.size] for k, v in self.data.items()}
        for i, part in enumerate(self.pending.values()):
            arrays.update({f"pending.{i}.{j}": a for j, a in enumerate(part)})
        if self.tree is not None:
            arrays["priorities"] = self.tree.values(self.size)
        np.savez(folder / ARRAYS_FILE, **arrays)
        (folder / JSON_FILE).write_text(json.dumps({
            "prioritized": self.prioritized, "size": self.size, "next": self.next,
            "max_priority": self.max_priority, "pending": list(self.pending)}))

    def load(self, folder: Path) -> bool:
        """Restore what `save` wrote into `folder`, if it holds a buffer; True if it did. The .npz is read
        with `allow_pickle=False`: a checkpoint from elsewhere cannot run code."""
        if not (folder / JSON_FILE).is_file():
            return False
        doc = json.loads((folder / JSON_FILE).read_text())
        if doc["prioritized"] != self.prioritized:
            raise UserError(f"replay.prioritized: the checkpoint's buffer has prioritized={doc['prioritized']}, "
                            f"this run's {self.prioritized}; resume with the same replay.prioritized.")
        if doc["size"] > self.capacity:
            raise UserError(f"replay.capacity: the checkpoint's buffer holds {doc['size']} transitions, more than "
                            f"this run's capacity {self.capacity}; resume with a capacity at least that.")
        self.size, self.next, self.max_priority = doc["size"], doc["next"], doc["max_priority"]
        with np.load(folder / ARRAYS_FILE, allow_pickle=False) as npz:
            self.data = {}
            for key in (k for k in npz.files if k.startswith("data.")):
                value = npz[key]
                self.data[key[5:]] = self._column_like(value)
                self.data[key[5:]][:self.size] = value
            self.pending = {episode: tuple(npz[f"pending.{i}.{j}"] for j in range(3))
                            for i, episode in enumerate(doc["pending"])}
            if self.tree is not None:
                self.tree.set(np.arange(self.size), npz["priorities"])
        return True
