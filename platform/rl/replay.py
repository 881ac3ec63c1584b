"""Experience replay as flat numpy arrays: n-step transitions in a ring buffer, uniform or prioritised,
each observation frame stored once.

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
A sum tree over p^α finds B stratified draws in log2(capacity) vectorised steps; uniform replay keeps a
leaf of 1 per row in the same tree.

Frames (`FrameFormat`): an observation is the last `stack` frames of its episode, concatenated along its
last axis (Atari's frame stack; 1 for any other env, whose observation is its one frame). Each frame is
written once into a ring of frames, numbered in the order written, and a row holds the frame numbers of its
s and s', so a batch gathers its observations from the ring. An episode's first observation is stored as
its frames (equal neighbours once: the env pads it with its first frame), each later one as its newest
frame, checked to be its predecessor shifted by one frame. An Atari row costs one 84×84 uint8 frame
(7 KB; the env's floats q/128 − 1 come back exactly) instead of its s and s' as 84×84×4 float32 stacks
(226 KB). The frame ring has room for `capacity` rows' frames plus one episode start per FRAME_SLACK rows;
where shorter episodes (or many parallel ones) outrun it, a row whose oldest frame was overwritten is
never drawn again (its slot waits for the row ring to come round to it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raycraft.errors import UserError

EPS = 1e-6
"""ε of p_i = |δ_i| + ε: keeps every row drawable."""
FRAME_SLACK = 8
"""The frame ring holds capacity · (1 + 1/FRAME_SLACK) frames (plus a stack and an n-step window)."""
JSON_FILE = "replay_buffer.json"
ARRAYS_FILE = "replay_buffer.npz"


@dataclass(frozen=True)
class FrameFormat:
    """What an env's observations are made of (the module docstring's Frames)."""

    stack: int = 1
    """Frames per observation, oldest first, concatenated along its last axis."""
    scale: float | None = None
    """Frames are uint8 images q that the env hands over as q · scale + offset: stored as the uint8 q. None:
    stored as the env gives them."""
    offset: float = 0.0


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

    def set(self, index: np.ndarray, value: np.ndarray | float) -> None:
        node = np.asarray(index) + self.leaves
        self.tree[node] = value
        while len(node) and node[0] > 1:
            node = np.unique(node // 2)
            self.tree[node] = self.tree[2 * node] + self.tree[2 * node + 1]

    def find(self, mass: np.ndarray) -> np.ndarray:
        """For each u in `mass` (0 ≤ u < total), the leaf i with Σ_{k<i} leaf_k ≤ u < Σ_{k≤i} leaf_k. A subtree
        that sums to 0 is never entered: a u rounded onto or past its start takes the last leaf before it."""
        node = np.ones(len(mass), dtype=np.int64)
        mass = mass.copy()
        while node[0] < self.leaves:
            left = self.tree[2 * node]
            right = (mass >= left) & (self.tree[2 * node + 1] > 0)
            mass -= left * right
            node = 2 * node + right
        return node - self.leaves


class TransitionReplay:
    """Ring buffer of n-step transitions fed by RLlib episode chunks, sampled as one dict of arrays; each
    observation frame is stored once, in a ring of frames (`FrameFormat`)."""

    def __init__(self, capacity: int, n_step: int, gamma: float, prioritized: bool = True, alpha: float = 0.6,
                 beta: float = 0.4, seed: int | None = None, frames: FrameFormat | None = None) -> None:
        self.capacity, self.n_step, self.gamma = capacity, n_step, gamma
        self.prioritized, self.alpha, self.beta = prioritized, alpha, beta
        self.format = frames or FrameFormat()
        self.rng = np.random.default_rng(seed)
        # Per row: action, R_t, terminated, m, and the frame numbers of s ("obs") and s' ("new_obs").
        self.rows: dict[str, np.ndarray] = {}
        self.size = self.next = 0
        self.max_priority = 1.0
        self.tree = SumTree(capacity)
        self.frame_slots = capacity + capacity // FRAME_SLACK + self.format.stack + n_step
        self.frames: np.ndarray | None = None  # the frame ring, allocated by the first `add`
        self.frames_written = 0  # the next frame's number; frame f lives in slot f % frame_slots
        self.obs_shape: tuple[int, ...] = ()
        self.obs_dtype: np.dtype | None = None
        # Per unfinished episode: the frame numbers of its last < n steps' observations and of its newest one,
        # and those steps' actions and rewards, whose n-step windows the next chunk completes.
        self.pending: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        """Rows that can be drawn."""
        return int(np.count_nonzero(self.tree.values(self.size)))

    def add(self, episodes: list[Any]) -> int:
        """Turn RLlib `SingleAgentEpisode` chunks into rows; returns how many rows were added."""
        added = 0
        for episode in episodes:
            actions = np.asarray(episode.get_actions())
            if len(actions) == 0:
                continue
            obs, rewards = np.asarray(episode.get_observations()), np.asarray(episode.get_rewards(), np.float32)
            pending = self.pending.pop(episode.id_, None)
            stacks = self._stacks(obs, None if pending is None else pending[0][-1])
            if pending is not None:  # its newest observation is this chunk's first
                p_stacks, p_actions, p_rewards = pending
                stacks = np.concatenate([p_stacks[:-1], stacks])
                actions, rewards = np.concatenate([p_actions, actions]), np.concatenate([p_rewards, rewards])
            done = episode.is_terminated or episode.is_truncated
            rows = self._n_step_rows(stacks, actions, rewards, done, episode.is_terminated)
            if not done:
                waiting = len(rows["actions"])  # the first step whose window the next chunk completes
                self.pending[episode.id_] = (stacks[waiting:], actions[waiting:], rewards[waiting:])
            added += self._write(rows)
        self._drop_overwritten()
        return added

    def _stacks(self, obs: np.ndarray, first: np.ndarray | None) -> np.ndarray:
        """Frame numbers (len(obs), stack) of one chunk's observations: the first's are `first` (None: its
        frames are written here), each later one's its predecessor's shifted by its newest frame, written here."""
        k = self.format.stack
        newest = obs[1:]
        if k > 1:
            width = obs.shape[-1] // k
            if not np.array_equal(obs[1:, ..., :-width], obs[:-1, ..., width:]):
                raise ValueError(f"replay: the observations are not stacks of {k} frames along their last axis, "
                                 "each the one before it shifted by one frame")
            newest = obs[1:, ..., -width:]
        if self.frames is None:
            self._allocate(obs.shape[1:], obs.dtype)
        if first is None:
            first = self._write_first(obs[0])
        numbers = np.concatenate([first, self._write_frames(newest)])
        return np.lib.stride_tricks.sliding_window_view(numbers, k)

    def _write_first(self, ob: np.ndarray) -> np.ndarray:
        """Frame numbers of an observation whose earlier frames are not in the ring: its own, a run of equal
        neighbours written once."""
        k = self.format.stack
        frames = np.moveaxis(ob.reshape(*ob.shape[:-1], k, -1), -2, 0) if k > 1 else ob[None]
        new = np.ones(k, bool)
        new[1:] = [not np.array_equal(a, b) for a, b in zip(frames[:-1], frames[1:], strict=True)]
        return self._write_frames(frames[new])[np.cumsum(new) - 1]

    def _allocate(self, obs_shape: tuple[int, ...], dtype: np.dtype) -> None:
        """The (still empty) frame ring for observations of `obs_shape` and `dtype`."""
        self.obs_shape, self.obs_dtype = tuple(obs_shape), np.dtype(dtype)
        frame = (*obs_shape[:-1], obs_shape[-1] // self.format.stack) if self.format.stack > 1 else obs_shape
        self.frames = np.zeros((self.frame_slots, *frame), dtype if self.format.scale is None else np.uint8)

    def _write_frames(self, frames: np.ndarray) -> np.ndarray:
        """Put `frames` into the ring over its oldest; their frame numbers."""
        numbers = self.frames_written + np.arange(len(frames))
        last = slice(max(len(frames) - self.frame_slots, 0), None)
        self.frames[numbers[last] % self.frame_slots] = self._encode(frames[last])
        self.frames_written += len(frames)
        return numbers

    def _encode(self, frames: np.ndarray) -> np.ndarray:
        """Frames as the ring stores them: the uint8 q of q · scale + offset, checked to decode to them exactly."""
        if self.format.scale is None:
            return frames
        q = np.clip(np.rint((frames - self.format.offset) / self.format.scale), 0, 255).astype(np.uint8)
        if not np.array_equal(self._decode(q), frames):
            raise ValueError(f"replay: the frames are not uint8 images q seen as q · {self.format.scale} + "
                             f"{self.format.offset}")
        return q

    def _n_step_rows(self, stacks: np.ndarray, actions: np.ndarray, rewards: np.ndarray, done: bool,
                     terminated: bool) -> dict[str, np.ndarray]:
        """Rows for every step t whose window is complete: t + n ≤ T, or any t once the episode is done."""
        steps = len(actions)
        t = np.arange(steps if done else max(steps - self.n_step + 1, 0))
        end = np.minimum(t + self.n_step, steps)  # t + m
        ret = np.zeros(len(t), np.float32)
        for k in range(self.n_step):
            inside = t + k < end
            ret += inside * self.gamma ** k * rewards[np.minimum(t + k, steps - 1)]
        return {"obs": stacks[t], "actions": actions[t], "rewards": ret, "new_obs": stacks[end],
                "terminateds": terminated & (end == steps), "n_step": (end - t).astype(np.float32)}

    def _write(self, rows: dict[str, np.ndarray]) -> int:
        count = len(rows["actions"])
        if not count:
            return 0
        if not self.rows:
            self.rows = {k: self._column_like(v) for k, v in rows.items()}
        if count > self.capacity:
            rows = {k: v[-self.capacity:] for k, v in rows.items()}
        index = (self.next + np.arange(len(rows["actions"]))) % self.capacity
        for key, value in rows.items():
            self.rows[key][index] = value
        self.tree.set(index, self.max_priority ** self.alpha)  # uniform: max_priority stays 1
        self.next = int(index[-1] + 1) % self.capacity
        self.size = min(self.size + len(index), self.capacity)
        return count

    def _column_like(self, rows: np.ndarray) -> np.ndarray:
        """An empty column of `capacity` rows shaped and typed like `rows`."""
        return np.zeros((self.capacity, *rows.shape[1:]), rows.dtype)

    def _drop_overwritten(self) -> None:
        """Rows whose oldest frame (the first of s) the frame ring has overwritten are never drawn again."""
        if self.size and self.frames_written > self.frame_slots:
            leaf = self.tree.values(self.size)
            oldest = self.rows["obs"][:self.size, 0]
            self.tree.set(np.flatnonzero((oldest < self.frames_written - self.frame_slots) & (leaf > 0)), 0.0)

    def sample(self, batch_size: int, batches: int = 1) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """(batch, row indices): `batches` batches of `batch_size` rows one after the other, each drawn on its own
        (a prioritised draw is stratified within each), in one pass over the tree and the columns. The columns
        are RLlib's names: obs, actions, rewards (R_t), new_obs (s'), terminateds, n_step (m), and the importance
        weights `weights` (all 1 for uniform replay)."""
        total = self.tree.total
        if total <= 0:
            raise ValueError("replay: sample() before any transition was added")
        rows = batch_size * batches
        u = self.rng.random(rows)
        stratum = np.arange(rows) % batch_size
        index = self.tree.find((stratum + u) * (total / batch_size) if self.prioritized else u * total)
        weights = np.ones(rows, np.float32)
        if self.prioritized:
            leaf = self.tree.values(self.size)
            p_min = np.min(leaf, where=leaf > 0, initial=np.inf)
            weights = ((leaf[index] / p_min) ** -self.beta).astype(np.float32)  # (N P(i))^-β / (N P_min)^-β
        batch = self.batch(index)
        batch["weights"] = weights
        return batch, index

    def batch(self, index: np.ndarray) -> dict[str, np.ndarray]:
        """The rows at `index`, their s and s' as the env gave them."""
        batch = {key: value[index] for key, value in self.rows.items()}
        for key in ("obs", "new_obs"):
            batch[key] = self._observations(batch[key])
        return batch

    def _observations(self, numbers: np.ndarray) -> np.ndarray:
        """Observations from the frame numbers (B, stack) of their frames. A stack comes back as a view of
        (B, stack, *frame) in memory (interleaving the frames took most of a sample's time); a network's
        channels-first permute makes it contiguous again."""
        frames = self.frames[numbers % self.frame_slots]
        if self.format.stack > 1:
            frames = np.moveaxis(frames, 1, -2)  # (..., stack, width): the stack's last axis, frame by frame
        obs = frames.reshape(len(numbers), *self.obs_shape)
        return obs if self.format.scale is None else self._decode(obs)

    def _decode(self, q: np.ndarray) -> np.ndarray:
        """q · scale + offset, computed in the observations' dtype (float32 q/128 − 1 for Atari: exact)."""
        kind = self.obs_dtype.type
        out = np.multiply(q, kind(self.format.scale), dtype=self.obs_dtype)
        out += kind(self.format.offset)
        return out

    def update_priorities(self, index: np.ndarray, td_error: np.ndarray) -> None:
        """p_i = |δ_i| + ε for the rows of the last batch (a row drawn twice keeps its last δ)."""
        if not self.prioritized:
            return
        priority = np.abs(np.asarray(td_error, np.float64)) + EPS
        self.max_priority = max(self.max_priority, float(priority.max()))
        self.tree.set(index, priority ** self.alpha)

    def save(self, folder: Path) -> None:
        """Write the contents into `folder`: arrays in replay_buffer.npz, numbers in replay_buffer.json."""
        arrays = {f"rows.{k}": v[:self.size] for k, v in self.rows.items()}
        arrays["priorities"] = self.tree.values(self.size)
        if self.frames is not None:
            arrays["frames"] = self.frames[:min(self.frames_written, self.frame_slots)]
        for i, part in enumerate(self.pending.values()):
            arrays.update({f"pending.{i}.{j}": a for j, a in enumerate(part)})
        np.savez(folder / ARRAYS_FILE, **arrays)
        (folder / JSON_FILE).write_text(json.dumps({
            "prioritized": self.prioritized, "size": self.size, "next": self.next,
            "max_priority": self.max_priority, "pending": list(self.pending), "frames_written": self.frames_written,
            "frame_slots": self.frame_slots, "obs_shape": self.obs_shape,
            "obs_dtype": None if self.obs_dtype is None else self.obs_dtype.str}))

    def load(self, folder: Path) -> bool:
        """Restore what `save` wrote into `folder`, if it holds a buffer; True if it did. The .npz is read
        with `allow_pickle=False`: a checkpoint from elsewhere cannot run code."""
        if not (folder / JSON_FILE).is_file():
            return False
        doc = json.loads((folder / JSON_FILE).read_text())
        if "frames_written" not in doc:
            raise UserError(f"--resume: the replay buffer in {folder} was saved by an older raycraft (a stacked "
                            "s and s' per row), which this one does not read; resume with that version, or "
                            "start a new run.")
        if doc["prioritized"] != self.prioritized:
            raise UserError(f"replay.prioritized: the checkpoint's buffer has prioritized={doc['prioritized']}, "
                            f"this run's {self.prioritized}; resume with the same replay.prioritized.")
        if doc["size"] > self.capacity:
            raise UserError(f"replay.capacity: the checkpoint's buffer holds {doc['size']} transitions, more than "
                            f"this run's capacity {self.capacity}; resume with a capacity at least that.")
        self.size, self.next, self.max_priority = doc["size"], doc["next"], doc["max_priority"]
        self.frames_written = doc["frames_written"]
        with np.load(folder / ARRAYS_FILE, allow_pickle=False) as npz:
            self.rows = {}
            for key in (k for k in npz.files if k.startswith("rows.")):
                self.rows[key[5:]] = self._column_like(npz[key])
                self.rows[key[5:]][:self.size] = npz[key]
            self.tree.set(np.arange(self.size), npz["priorities"])
            if doc["obs_dtype"]:
                self._allocate(tuple(doc["obs_shape"]), np.dtype(doc["obs_dtype"]))
                saved = npz["frames"]
                numbers = np.arange(self.frames_written - min(len(saved), self.frame_slots), self.frames_written)
                self.frames[numbers % self.frame_slots] = saved[numbers % doc["frame_slots"]]
            self.pending = {episode: tuple(npz[f"pending.{i}.{j}"] for j in range(3))
                            for i, episode in enumerate(doc["pending"])}
        self._drop_overwritten()
        return True
