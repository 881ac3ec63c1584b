"""raycraft DQN vs Stable-Baselines3's DQN with RL Zoo's CartPole settings (and RLlib's tuned CartPole DQN
example): env steps and wall seconds to eval return ≥ 475.

Same machine, same process, seeds one after the other, same evaluation protocol (greedy policy,
`--eval-episodes` episodes after every 1000 env steps). raycraft runs its CartPole preset (`raycraft rl dqn
--env CartPole-v1`); SB3 (benchmarks/sb3_zoo.py, the `bench` extra) runs rl-baselines3-zoo's hyperparameters.
The RLlib baseline is rllib/tuned_examples/dqn/cartpole_dqn.py (Ray 2.60): lr 5e-4, batch 32, prioritised
replay 50k, n_step (2, 5), double + dueling, ε 1 → 0.02 over 10k steps, 256-unit tanh torso and head.

    .venv/bin/python benchmarks/rl_cartpole.py --skip-rllib [--seeds 0 1 2] [--max-steps 100000]

Twenty seeds by default (17-20 minutes with SB3 here): the steps a run needs depend on its seed far more
than on the library (SB3's median was 13,000 over seeds 0-9 and 26,500 over seeds 10-19), so a ratio of
medians over a few seeds says little; the report gives its bootstrap interval.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from rl_results import PEER, Result, report

TARGET = 475.0


def rllib_tuned_config(seed: int, eval_episodes: int):
    from ray.rllib.algorithms.dqn import DQNConfig
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig

    return (DQNConfig()
            .environment(env="CartPole-v1")
            .training(lr=0.0005, train_batch_size_per_learner=32,
                      replay_buffer_config={"type": "PrioritizedEpisodeReplayBuffer", "capacity": 50000,
                                            "alpha": 0.6, "beta": 0.4},
                      n_step=(2, 5), double_q=True, dueling=True, epsilon=[(0, 1.0), (10000, 0.02)])
            .rl_module(model_config=DefaultModelConfig(fcnet_hiddens=[256], fcnet_activation="tanh",
                                                       fcnet_bias_initializer="zeros_",
                                                       head_fcnet_bias_initializer="zeros_",
                                                       head_fcnet_hiddens=[256]))
            .evaluation(evaluation_interval=1, evaluation_duration=eval_episodes,
                        evaluation_duration_unit="episodes", evaluation_num_env_runners=0)
            .reporting(min_sample_timesteps_per_iteration=1000, min_time_s_per_iteration=0)
            .debugging(seed=seed, log_level="ERROR"))


def run_rllib(seed: int, max_steps: int, eval_episodes: int) -> Result:
    """(env steps, wall s, best eval return) of the tuned example until eval ≥ TARGET or max_steps."""
    from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, EPISODE_RETURN_MEAN, EVALUATION_RESULTS

    from raycraft.rl.run import iteration_metrics

    algo = rllib_tuned_config(seed, eval_episodes).build_algo()
    start, best = time.perf_counter(), float("-inf")
    try:
        while True:
            result = algo.train()
            m = iteration_metrics(result)
            best = max(best, result.get(EVALUATION_RESULTS, {}).get(ENV_RUNNER_RESULTS, {}).get(EPISODE_RETURN_MEAN,
                                                                                                 best))
            if best >= TARGET or m["env_steps"] >= max_steps:
                return Result(m["env_steps"], time.perf_counter() - start, best)
    finally:
        algo.stop()


def run_raycraft(seed: int, max_steps: int, eval_episodes: int, overrides: list[str], uri: str,
                 storage: str) -> Result:
    from raycraft.rl.config import build_rl_config
    from raycraft.rl.run import train_rl

    cfg, model_cfg = build_rl_config({"algo": "dqn", "env": "CartPole-v1", "seed": seed, "timesteps": max_steps,
                                      "eval_episodes": eval_episodes, "storage_path": storage}, overrides)
    out = train_rl(cfg, model_cfg, tracking_uri=uri)
    best = max(m.get("eval_return_mean", float("-inf")) for m in out.history)
    return Result(out.env_steps, out.wall_s, best)


def run_sb3(seed: int, max_steps: int, eval_episodes: int) -> Result:
    import sb3_zoo

    return sb3_zoo.run_sb3("dqn", "CartPole-v1", seed, max_steps=max_steps, eval_every=1000,
                           eval_episodes=eval_episodes, target=TARGET)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(20)))
    parser.add_argument("--max-steps", type=int, default=100_000)
    parser.add_argument("--eval-episodes", type=int, default=5)
    parser.add_argument("--skip-rllib", action="store_true", help="No RLlib tuned example.")
    parser.add_argument("--skip-sb3", action="store_true", help="No Stable-Baselines3 (no `bench` extra needed).")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="Change raycraft's preset, as `raycraft rl dqn --set` does (repeatable).")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from raycraft.cluster import init_ray

    init_ray()
    runs = {"raycraft": lambda seed, tmp: run_raycraft(seed, args.max_steps, args.eval_episodes, args.set,
                                                       f"sqlite:///{tmp}/mlflow.db", f"{tmp}/ray_results")}
    if not args.skip_sb3:
        runs[PEER] = lambda seed, tmp: run_sb3(seed, args.max_steps, args.eval_episodes)
    if not args.skip_rllib:
        runs["rllib-tuned"] = lambda seed, tmp: run_rllib(seed, args.max_steps, args.eval_episodes)
    rows: dict[str, list[Result]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for name, run in runs.items():
                rows[name].append(run(seed, tmp))
                r = rows[name][-1]
                print(f"{name:12s} seed {seed}: steps {r.steps:.0f}  wall {r.wall_s:.1f} s  best eval "
                      f"{r.best_eval:.1f}  (load average {os.getloadavg()[0]:.2f})", flush=True)
    report(rows, TARGET, goal=1.0)


if __name__ == "__main__":
    main()
