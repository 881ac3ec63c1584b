"""raycraft DQN vs RLlib's tuned CartPole DQN example: env steps and wall seconds to eval return ≥ 475.

Same machine, same Ray, same process, same evaluation protocol (greedy policy, `--eval-episodes` episodes
after every 1000-step iteration). The baseline is rllib/tuned_examples/dqn/cartpole_dqn.py (Ray 2.60):
lr 5e-4, batch 32, prioritised replay 50k, n_step (2, 5), double + dueling, ε 1 → 0.02 over 10k steps,
256-unit tanh torso and head. raycraft runs its CartPole preset (`raycraft rl dqn --env CartPole-v1`).

    .venv/bin/python benchmarks/rl_cartpole.py --seeds 0 1 2 [--max-steps 100000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

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


def run_rllib(seed: int, max_steps: int, eval_episodes: int) -> tuple[float, float, float]:
    """(env steps, wall s, best eval return) of the tuned example until eval ≥ TARGET or max_steps."""
    from raycraft.rl.run import iteration_metrics

    algo = rllib_tuned_config(seed, eval_episodes).build_algo()
    start, best = time.perf_counter(), float("-inf")
    try:
        while True:
            m = iteration_metrics(algo.train())
            best = max(best, m.get("eval_return_mean", best))
            if best >= TARGET or m["env_steps"] >= max_steps:
                return m["env_steps"], time.perf_counter() - start, best
    finally:
        algo.stop()


def run_raycraft(seed: int, max_steps: int, eval_episodes: int, uri: str, storage: str) -> tuple[float, float, float]:
    from raycraft.rl.config import build_rl_config
    from raycraft.rl.run import train_rl

    cfg, model_cfg = build_rl_config({"algo": "dqn", "env": "CartPole-v1", "seed": seed, "timesteps": max_steps,
                                      "eval_episodes": eval_episodes, "storage_path": storage}, [])
    out = train_rl(cfg, model_cfg, tracking_uri=uri)
    best = max(m.get("eval_return_mean", float("-inf")) for m in out.history)
    return out.env_steps, out.wall_s, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-steps", type=int, default=100_000)
    parser.add_argument("--eval-episodes", type=int, default=5)
    parser.add_argument("--skip-rllib", action="store_true", help="Only raycraft (no baseline ratio).")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from raycraft.cluster import init_ray

    init_ray()
    rows: dict[str, list[tuple[float, float, float]]] = {"raycraft": [], "rllib-tuned": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            rows["raycraft"].append(run_raycraft(seed, args.max_steps, args.eval_episodes,
                                                 f"sqlite:///{tmp}/mlflow.db", f"{tmp}/ray_results"))
            print(f"raycraft    seed {seed}: steps {rows['raycraft'][-1][0]:.0f}  wall {rows['raycraft'][-1][1]:.0f} s"
                  f"  best eval {rows['raycraft'][-1][2]:.1f}", flush=True)
            if not args.skip_rllib:
                rows["rllib-tuned"].append(run_rllib(seed, args.max_steps, args.eval_episodes))
                r = rows["rllib-tuned"][-1]
                print(f"rllib-tuned seed {seed}: steps {r[0]:.0f}  wall {r[1]:.0f} s  best eval {r[2]:.1f}", flush=True)
    print(f"\nto eval return >= {TARGET:g} (a run that did not reach it counts its full length)")
    for name, results in rows.items():
        if results:
            solved = sum(r[2] >= TARGET for r in results)
            steps, wall = statistics.median(r[0] for r in results), statistics.median(r[1] for r in results)
            print(f"{name:12s} solved {solved}/{len(results)}  median steps {steps:.0f}  median wall {wall:.0f} s")
    if rows["rllib-tuned"]:
        ratio = statistics.median(r[1] for r in rows["raycraft"]) / statistics.median(r[1] for r in rows["rllib-tuned"])
        print(f"wall-time ratio raycraft / rllib-tuned: {ratio:.2f} (goal <= 0.5)")


if __name__ == "__main__":
    main()
