"""Atari replay before and after the frame ring: bytes and resident memory per transition, and env steps/s.

The baseline is the replay as it was before it stored each frame once (commit BASELINE, read with
`git show`): every row held its s and s' as the env hands them, two 84×84×4 float32 stacks. Both layouts
get the same real Pong play (`make_atari("ALE/Pong-v5")`, random actions), in the same run:

- bytes per transition: the buffer's arrays over its capacity (`--capacity`, the preset's 100k);
- resident memory: a fresh process fills a buffer of `--fill` transitions (`--old-fill` for the
  baseline, whose 100k would need 22.6 GB) with 1.25 times as many and reports the growth of its RSS;
- replay steps/s: in that process, the preset's add/sample path on the filled buffer: one 1-step chunk
  added per env step (the preset's n_step 1 makes RLlib hand over 1-step chunks), a batch of 32 drawn and
  its priorities written every 4 steps (training_intensity 8);
- env steps/s: Pong alone; and, with `--dqn-steps`, raycraft's DQN on Pong in this process with either
  replay (the Atari preset, learning from step 500, 500 steps an iteration), the two taking turns an
  iteration each; by the wall clock and per CPU second of this process (the machine may be shared).

    .venv/bin/python benchmarks/atari_replay.py [--steps 1000] [--fill 100000] [--old-fill 5000] [--dqn-steps 2000]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import psutil
from ray.rllib.env.single_agent_episode import SingleAgentEpisode

REPO = Path(__file__).resolve().parents[1]
BASELINE = "599267f"
"""The last commit whose replay stored each row's s and s' stacks."""
ENV = "ALE/Pong-v5"


def baseline_replay() -> type:
    """The baseline's `TransitionReplay`, compiled from its source at BASELINE."""
    source = subprocess.run(["git", "show", f"{BASELINE}:platform/rl/replay.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType("replay_at_baseline")
    exec(compile(source, f"{BASELINE}:platform/rl/replay.py", "exec"), module.__dict__)  # this repository's own code
    return module.TransitionReplay


def new_replay(layout: str, capacity: int):
    """A prioritised replay of `capacity` n=1 transitions laid out as `layout` (old or new)."""
    from raycraft.rl.environments import ATARI_FRAMES
    from raycraft.rl.replay import TransitionReplay

    if layout == "old":
        return baseline_replay()(capacity=capacity, n_step=1, gamma=0.99, seed=0)
    return TransitionReplay(capacity=capacity, n_step=1, gamma=0.99, seed=0, frames=ATARI_FRAMES)


def record(steps: int, path: Path) -> float:
    """Play `steps` Pong steps with random actions into `path` (.npz: obs, actions, rewards, ends); env steps/s."""
    from raycraft.rl.environments import make_atari

    env, rng = make_atari(ENV), np.random.default_rng(0)
    obs, _ = env.reset(seed=0)
    frames, actions, rewards, ends = [obs], [], [], []  # ends: (index of the step, terminated) of each episode
    start = time.perf_counter()
    for t in range(steps):
        obs, reward, terminated, truncated, _ = env.step(int(rng.integers(env.action_space.n)))
        frames.append(obs)
        actions.append(len(actions))
        rewards.append(reward)
        if terminated or truncated:
            ends.append((t, terminated))
            frames.append(env.reset()[0])
    rate = steps / (time.perf_counter() - start)
    np.savez(path, obs=np.array(frames), actions=np.array(actions), rewards=np.array(rewards, np.float32),
             ends=np.array(ends, np.int64).reshape(-1, 2))
    return rate


def episodes(path: Path, chunk: int | None):
    """The recorded episodes as RLlib hands them over: chunks of `chunk` steps (None: whole episodes)."""
    with np.load(path) as npz:
        obs, actions, rewards, ends = npz["obs"], npz["actions"], npz["rewards"], npz["ends"]
    end_at = {int(t): bool(term) for t, term in ends}
    row, episode = 0, None
    for t in range(len(actions)):
        if episode is None:
            episode = SingleAgentEpisode()
            episode.add_env_reset(obs[row])
        row += 1
        done = t in end_at or t == len(actions) - 1
        episode.add_env_step(obs[row], actions[t], rewards[t], terminated=end_at.get(t, False),
                             truncated=done and t not in end_at)
        if done:
            yield episode.to_numpy()
            episode, row = None, row + 1 if t in end_at else row
        elif chunk and len(episode) == chunk:
            rest = episode.cut()
            yield episode.to_numpy()
            episode = rest


def fill(buf, transitions: int, path: Path) -> None:
    """Add the recorded episodes to `buf`, over and over, until it has taken `transitions`."""
    added = 0
    while added < transitions:
        for episode in episodes(path, None):
            added += buf.add([episode])


def measure(layout: str, capacity: int, path: Path) -> dict[str, float]:
    """In this (fresh) process, a buffer of `capacity` that has taken 1.25 times as many transitions (its
    rings have wrapped): its arrays' bytes and RSS growth per transition, then the add/sample path's steps/s."""
    process = psutil.Process()
    fill(new_replay(layout, 100), 1000, path)  # what the first adds allocate for good is not the buffer's
    gc.collect()  # episodes hold reference cycles: their arrays leave the RSS only once collected
    before = process.memory_info().rss
    buf = new_replay(layout, capacity)
    fill(buf, capacity * 5 // 4, path)
    gc.collect()
    rss = process.memory_info().rss - before
    arrays = [*buf.data.values()] if layout == "old" else [buf.frames, *buf.rows.values()]
    chunks, rng = list(episodes(path, 1)), np.random.default_rng(0)
    start, cpu = time.perf_counter(), time.process_time()
    for i, chunk in enumerate(chunks):
        buf.add([chunk])
        if i % 4 == 0:
            _, rows = buf.sample(32)
            buf.update_priorities(rows, rng.random(32))
    return {"capacity": capacity, "rss_mb": rss / 2**20, "rss_per_transition": rss / capacity,
            "bytes_per_transition": sum(a.nbytes for a in arrays) / capacity,
            "replay_steps_per_s": len(chunks) / (time.perf_counter() - start),
            "replay_cpu_ms": (time.process_time() - cpu) / len(chunks) * 1e3}


def dqn(layout: str, steps: int, storage: str):
    """raycraft's DQN on Pong with the `layout` replay: the Atari preset, learning from step 500, 500 steps an
    iteration, sampling and learning in this process."""
    from raycraft.rl.config import build_rl_config
    from raycraft.rl.dqn import DQN
    from raycraft.rl.run import algorithm_config, prepare

    class BaselineDQN(DQN):
        def _create_local_replay_buffer_if_necessary(self, config):
            replay = config["replay_buffer_config"]
            return baseline_replay()(capacity=int(replay["capacity"]), n_step=int(config["n_step"]),
                                     gamma=config["gamma"], alpha=replay["alpha"], beta=replay["beta"],
                                     seed=config["seed"])

    cfg, model_cfg = build_rl_config({"algo": "dqn", "env": ENV, "timesteps": steps, "learning_starts": 500,
                                      "steps_per_iter": 500, "storage_path": storage}, [])
    config = algorithm_config(cfg, model_cfg, prepare(cfg, model_cfg).module_class)
    if layout == "old":
        config.algo_class = BaselineDQN
    return config.build_algo()


def dqn_rates(steps: int, storage: str) -> dict[str, list[tuple[float, float]]]:
    """Per layout, the DQN's env steps/s by the wall clock and by this process's CPU time: its first iteration
    (before learning starts) and the mean of the others. The two take turns, an iteration each, so that the
    shared machine's load weighs on both alike."""
    from raycraft.rl.run import iteration_metrics

    algos = {layout: dqn(layout, steps, storage) for layout in ("old", "new")}
    rates: dict[str, list[tuple[float, float]]] = {layout: [] for layout in algos}
    done = dict.fromkeys(algos, 0.0)
    try:
        while min(done.values()) < steps:
            for layout, algo in algos.items():
                wall, cpu = time.perf_counter(), time.process_time()
                sampled = iteration_metrics(algo.train())["env_steps"] - done[layout]
                rates[layout].append((sampled / (time.perf_counter() - wall), sampled / (time.process_time() - cpu)))
                done[layout] += sampled
    finally:
        for algo in algos.values():
            algo.stop()
    return {layout: [r[0], tuple(np.mean(r[1:], axis=0)) if len(r) > 1 else (float("nan"),) * 2]
            for layout, r in rates.items()}


def in_child(layout: str, capacity: int, path: Path) -> dict[str, float]:
    """`measure` in a fresh interpreter, so that each RSS figure holds one buffer only."""
    out = subprocess.run([sys.executable, __file__, "--child", layout, "--fill", str(capacity), "--cache", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="Pong steps recorded (and timed through the replay).")
    parser.add_argument("--fill", type=int, default=100_000, help="Transitions in the new layout's filled buffer.")
    parser.add_argument("--old-fill", type=int, default=5000, help="Transitions in the baseline's filled buffer.")
    parser.add_argument("--dqn-steps", type=int, default=2000, help="Env steps of each DQN run (0: none).")
    parser.add_argument("--child", choices=["old", "new"], help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.fill, args.cache)))
        return
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pong.npz"
        print(f"Pong alone, random actions: {record(args.steps, path):.1f} env steps/s", flush=True)
        for layout, count in (("old", args.old_fill), ("new", args.old_fill), ("new", args.fill)):
            r = in_child(layout, count, path)
            print(f"{layout} layout, {count} transitions: {r['bytes_per_transition']:,.0f} B/transition in its arrays, "
                  f"RSS +{r['rss_mb']:,.0f} MB ({r['rss_per_transition']:,.0f} B/transition), "
                  f"add/sample path {r['replay_steps_per_s']:,.0f} env steps/s ({r['replay_cpu_ms']:.2f} CPU ms "
                  "per step)", flush=True)
        if args.dqn_steps:
            import torch

            from raycraft.cluster import init_ray

            torch.set_num_threads(1)  # as `raycraft rl` runs
            init_ray()
            for layout, ((before, before_cpu), (learning, learning_cpu)) in dqn_rates(
                    args.dqn_steps, f"{tmp}/ray_results").items():
                print(f"{layout} layout, DQN on Pong: {before:.1f} env steps/s before learning, {learning:.1f} while "
                      f"learning (per CPU second of this process: {before_cpu:.1f}, {learning_cpu:.1f})", flush=True)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
