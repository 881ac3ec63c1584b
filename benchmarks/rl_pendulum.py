"""raycraft DDPG on Pendulum-v1 (eval return ≥ −200 within 20k env steps) against Stable-Baselines3's DDPG
with RL Zoo's Pendulum settings, and on raycraft/Portfolio-v0; each trained policy against a random policy
and a simple heuristic, measured in the same run.

Pendulum vs SB3 (benchmarks/sb3_zoo.py, the `bench` extra): same process, seeds one after the other, same
evaluation protocol (greedy policy, `--eval-episodes` episodes after every 1000 env steps, stop at −200);
env steps and wall seconds until the target, their medians and the wall-time ratio.
Pendulum heuristic: energy-shaping swing-up + PD balance (torque from the observation [cos θ, sin θ, θ̇]).
Portfolio heuristic: equal weights every step (the 1/N rule).

    .venv/bin/python benchmarks/rl_pendulum.py --seeds 0 1 2 --skip-portfolio
    .venv/bin/python benchmarks/rl_pendulum.py [--seed 0] [--episodes 20] [--skip-sb3]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import torch
from rl_results import PEER, Result, report

TARGET = -200.0


def pendulum_heuristic(obs: np.ndarray) -> np.ndarray:
    """Pump energy towards the upright energy, then hold with PD once close to the top."""
    cos, sin, omega = obs
    theta = np.arctan2(sin, cos)  # 0 = upright
    if cos > 0.85:
        return np.array([np.clip(-10.0 * theta - 2.0 * omega, -2.0, 2.0)], np.float32)
    energy = 0.5 * omega ** 2 + 10.0 * (cos - 1.0)  # 0 at rest upright (g = 10, m = l = 1)
    return np.array([np.clip(-2.0 * np.sign(omega * energy) if omega else 2.0, -2.0, 2.0)], np.float32)


def rollout(env_name: str, policy, episodes: int, seed: int) -> float:
    from raycraft.rl.environments import make

    env = make(env_name)
    total = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        ret, done = 0.0, False
        while not done:
            obs, r, term, trunc, _ = env.step(policy(obs))
            ret, done = ret + float(r), term or trunc
        total.append(ret)
    return float(np.mean(total))


def train_and_compare(env_name: str, heuristic, seed: int, episodes: int, train: dict, overrides: list[str],
                      uri: str, storage: str) -> Result:
    """Train raycraft's preset for `env_name` (with the keys of `train` and then `overrides` over it), then
    roll out the trained, a random and the heuristic policy for `episodes` episodes each."""
    from ray.rllib.core.rl_module.rl_module import RLModule

    from raycraft.rl.config import build_rl_config
    from raycraft.rl.environments import make
    from raycraft.rl.evaluation import play
    from raycraft.rl.run import train_rl

    cfg, model_cfg = build_rl_config({"algo": "ddpg", "env": env_name, "seed": seed, "storage_path": storage,
                                      **train}, overrides)
    out = train_rl(cfg, model_cfg, tracking_uri=uri,
                   on_iteration=lambda m: print(f"  {env_name} steps {m['env_steps']:.0f}  "
                                                f"eval {m.get('eval_return_mean', float('nan')):.1f}  "
                                                f"steps/s {m['steps_per_s']:.1f}", flush=True))
    first = next((m for m in out.history if m.get("eval_return_mean", -np.inf) >= (cfg.stop_reward or np.inf)), None)
    module = RLModule.from_checkpoint(f"{out.checkpoint}/learner_group/learner/rl_module/default_policy")
    space = make(env_name).action_space
    space.seed(seed)
    results = {"ddpg": float(np.mean(play(module, env_name, {}, episodes, seed=10_000))),
               "random": rollout(env_name, lambda obs: space.sample(), episodes, 10_000),
               "heuristic": rollout(env_name, heuristic, episodes, 10_000)}
    print(f"\n{env_name}: trained {out.env_steps} env steps in {out.wall_s:.0f} s wall"
          + (f"; first eval >= {cfg.stop_reward:g} at {first['env_steps']:.0f} steps, {first['wall_s']:.0f} s"
             if first else "; target not reached"))
    for name, value in results.items():
        print(f"  {name:9s} mean return over {episodes} episodes: {value:9.2f}")
    print(f"  ddpg - random = {results['ddpg'] - results['random']:.2f}; "
          f"ddpg - heuristic = {results['ddpg'] - results['heuristic']:.2f}", flush=True)
    best = max(m.get("eval_return_mean", -np.inf) for m in out.history)
    return Result(out.env_steps, out.wall_s, best)


def run_sb3(seed: int, max_steps: int, eval_episodes: int) -> Result:
    import sb3_zoo

    r = sb3_zoo.run_sb3("ddpg", "Pendulum-v1", seed, max_steps=max_steps, eval_every=1000,
                        eval_episodes=eval_episodes, target=TARGET)
    print(f"{PEER} Pendulum-v1 seed {seed}: steps {r.steps:.0f}  wall {r.wall_s:.1f} s  best eval {r.best_eval:.1f}"
          f"  (load average {os.getloadavg()[0]:.2f})", flush=True)
    return r


def main() -> None:
    from raycraft.cluster import init_ray
    from raycraft.envs import PORTFOLIO
    from raycraft.envs.portfolio import equal_weight_policy

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", help="Several seeds, one after the other (default: --seed).")
    parser.add_argument("--episodes", type=int, default=20, help="Episodes of each policy's final rollout.")
    parser.add_argument("--eval-episodes", type=int, default=10, help="Episodes per evaluation while training.")
    parser.add_argument("--max-steps", type=int, default=20_000)
    parser.add_argument("--skip-pendulum", action="store_true")
    parser.add_argument("--skip-portfolio", action="store_true")
    parser.add_argument("--skip-sb3", action="store_true", help="No Stable-Baselines3 (no `bench` extra needed).")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="Change raycraft's Pendulum preset, as `raycraft rl ddpg --set` does (repeatable).")
    args = parser.parse_args()
    torch.set_num_threads(1)
    init_ray()
    train = {"timesteps": args.max_steps, "eval_episodes": args.eval_episodes}
    rows: dict[str, list[Result]] = {"raycraft": []} | ({} if args.skip_sb3 else {PEER: []})
    with tempfile.TemporaryDirectory() as tmp:
        uri, storage = f"sqlite:///{tmp}/mlflow.db", f"{tmp}/ray_results"
        for seed in args.seeds or [args.seed]:
            if not args.skip_pendulum:
                rows["raycraft"].append(train_and_compare("Pendulum-v1", pendulum_heuristic, seed, args.episodes,
                                                          train, args.set, uri, storage))
                print(f"  (load average {os.getloadavg()[0]:.2f})")
                if not args.skip_sb3:
                    rows[PEER].append(run_sb3(seed, args.max_steps, args.eval_episodes))
            if not args.skip_portfolio:
                train_and_compare(PORTFOLIO, equal_weight_policy, seed, args.episodes, {}, [], uri, storage)
    if rows["raycraft"]:
        report(rows, TARGET, goal=0.5)


if __name__ == "__main__":
    main()
