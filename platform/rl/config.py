"""The typed config of one RL run (`raycraft rl ALGO --env ENV`): every hyperparameter documented here.

Precedence, lowest first: these defaults, the preset for (algo, env) in `PRESETS`, a YAML file
(`--config`), flags, then `--set key=value`, merged by `config.build`. Keys whose head is not a field of
`RLConfig` go to the model's config (`--set dueling=false` == `--set model_args.dueling=false`), in YAML as
with `--set`. Everything is checked before Ray starts (here, then in `rl.run.prepare`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from raycraft.config import MODEL_ARGS, JobConfig, build
from raycraft.envs import ATARI_PREFIX
from raycraft.errors import UserError, check_count, invalid_choice
from raycraft.registry import ModelSpec, field_doc, model_spec, models

ALGOS = ("dqn", "ddpg")
DEFAULT_MODEL = {"dqn": "q_mlp", "ddpg": "ddpg_mlp"}
ATARI_MODEL = "q_nature_cnn"
MAX_TIMESTEPS = 10**10  # 1,000x the Atari preset and 50x Nature DQN's 200M frames: beyond it is a typo


@dataclass
class ReplayConfig:
    capacity: int = field_doc(50_000, "Transitions the replay buffer holds (oldest dropped first; Atari's cost "
                                      "about 8 KB each, 100k about 0.8 GB). Where episodes average under 8 steps, "
                                      "fewer stay drawable (each episode's first frame takes a slot too).")
    prioritized: bool = field_doc(True, "Prioritised replay (Schaul et al., 2016): sample ∝ |TD error|^alpha.")
    alpha: float = field_doc(0.6, "Priority exponent; 0 = uniform.")
    beta: float = field_doc(0.4, "Importance-sampling exponent that corrects the prioritised sampling bias.")
    save_in_checkpoint: bool = field_doc(
        False, "Save the buffer's contents with each checkpoint (arrays in .npz, the rest in JSON: no pickle) "
               "so that `--resume` continues with a full buffer instead of refilling it. Costs up to `capacity` "
               "transitions of disk per checkpoint (Atari: about 8 KB each, one 84×84 uint8 frame).")


@dataclass
class DQNArgs:
    epsilon_initial: float = field_doc(1.0, "Probability of a random action at step 0.")
    epsilon_final: float = field_doc(0.02, "Probability of a random action after `epsilon_timesteps`.")
    epsilon_timesteps: int = field_doc(10_000, "Env steps over which epsilon decays linearly.")
    target_update_freq: int = field_doc(500, "Env steps between copies of the online net into the target net.")
    td_loss: Literal["huber", "mse"] = field_doc("huber", "Loss on the TD error.")


@dataclass
class DDPGArgs:
    actor_lr: float = field_doc(1e-3, "Adam learning rate of the actor μ(s).")
    critic_lr: float = field_doc(1e-3, "Adam learning rate of the critic Q(s, a).")
    tau: float = field_doc(0.005, "Soft target update rate: θ⁻ ← τθ + (1 − τ)θ⁻ after every update.")
    noise: Literal["gaussian", "ou"] = field_doc("gaussian", "Exploration noise added to μ(s): Gaussian or "
                                                 "Ornstein–Uhlenbeck (temporally correlated).")
    noise_sigma: float = field_doc(0.1, "Noise scale, in units of the normalised action range [−1, 1].")
    ou_theta: float = field_doc(0.15, "OU mean reversion per step (noise=ou only).")


@dataclass
class RLConfig(JobConfig):
    algo: Literal["dqn", "ddpg"] = field_doc("dqn", "Algorithm: dqn (discrete actions) or ddpg (continuous).")
    env: str = field_doc("CartPole-v1", "Environment id: any gymnasium id, ALE/<Game>-v5, raycraft/Portfolio-v0.")
    env_config: dict = field_doc(None, "Keyword arguments for the environment's constructor.", factory=dict)
    model: str = field_doc("", "Registered RL model (`raycraft models`); empty = q_mlp / q_nature_cnn / ddpg_mlp.")
    model_args: dict = field_doc(None, "The model's config keys (`raycraft models --details MODEL`).", factory=dict)
    timesteps: int = field_doc(100_000, "Stop after this many env steps.")
    stop_reward: float | None = field_doc(None, "Stop once the evaluation return mean reaches this.")
    seed: int = field_doc(0, "Seed of the networks, the envs and exploration.")
    workers: int = field_doc(0, "EnvRunner actors sampling in parallel, while the learner learns; 0 samples in the "
                                "driver process, between learning phases (faster on 2 cores: docs/rl.md).")
    envs_per_worker: int = field_doc(1, "Vectorised env copies per EnvRunner.")
    gamma: float = field_doc(0.99, "Discount factor γ.")
    lr: float = field_doc(5e-4, "Adam learning rate (DQN; DDPG uses ddpg.actor_lr and ddpg.critic_lr).")
    batch_size: int = field_doc(32, "Transitions per gradient update.")
    n_step: int = field_doc(1, "n-step returns: r_t + γ r_{t+1} + ... + γⁿ Q(s_{t+n}).")
    learning_starts: int = field_doc(1000, "Env steps collected before the first update.")
    training_intensity: float | None = field_doc(
        None, "Replayed per sampled transitions (e.g. 32 = one batch of 32 per env step); None = RLlib's "
              "natural ratio, one update per rollout fragment.")
    train_every: int = field_doc(
        1, "Env steps each env copy samples between learning phases (RLlib's rollout fragment; raised to n_step "
           "if smaller). A phase makes train_every × envs_per_worker × max(workers, 1) × training_intensity / "
           "batch_size gradient steps in one Learner call, then syncs the EnvRunners' weights once: larger costs "
           "less per step, smaller acts on fresher weights.")
    grad_clip: float | None = field_doc(40.0, "Clip the global gradient norm to this (None = no clipping).")
    steps_per_iter: int = field_doc(1000, "Env steps per training iteration (one progress line, one log point).")
    replay: ReplayConfig = field_doc(None, "Experience replay.", factory=ReplayConfig)
    dqn: DQNArgs = field_doc(None, "DQN's own settings.", factory=DQNArgs)
    ddpg: DDPGArgs = field_doc(None, "DDPG's own settings.", factory=DDPGArgs)
    eval_interval: int = field_doc(1, "Evaluate the greedy policy every this many iterations.")
    eval_episodes: int = field_doc(10, "Episodes per evaluation.")
    checkpoint_every: int = field_doc(5, "Save a checkpoint every this many iterations (and at the end).")
    experiment: str = field_doc("raycraft-rl", "MLflow experiment name.")
    storage_path: str = field_doc("ray_results", "Folder of checkpoints (one subfolder per run).")
    log_checkpoint: bool = field_doc(
        True, "When the run ends (finished, stopped or failed), log its last algorithm checkpoint to MLflow "
              "(artifact checkpoint/), so that `--resume` works on a machine without the local folder. It holds the "
              "networks with their target copies and optimizer state (CartPole's MLP: about 0.6 MiB; Pong's Nature "
              "CNN: about 28 MiB) and, with replay.save_in_checkpoint, the replay buffer (Atari: about 8 KB a "
              "transition, 0.8 GB at 100k).")

    def __post_init__(self) -> None:
        if not self.model:
            self.model = ATARI_MODEL if self.env.startswith(ATARI_PREFIX) else DEFAULT_MODEL[self.algo]
        for key in ("timesteps", "batch_size", "n_step", "train_every", "steps_per_iter", "eval_episodes",
                    "eval_interval", "checkpoint_every", "envs_per_worker"):
            if getattr(self, key) < 1:
                raise UserError(f"{key}: must be at least 1, got {getattr(self, key)}.")
        check_count("--timesteps", self.timesteps, MAX_TIMESTEPS)
        if self.workers < 0:
            raise UserError(f"workers: must be 0 or more, got {self.workers}.")
        if not 0.0 < self.gamma <= 1.0:
            raise UserError(f"gamma: must be in (0, 1], got {self.gamma}.")
        if not 0.0 < self.ddpg.tau <= 1.0:
            raise UserError(f"ddpg.tau: must be in (0, 1], got {self.ddpg.tau}.")
        if "://" in self.storage_path:
            raise UserError(f"storage_path: {self.storage_path.split('://')[0]}:// is for `raycraft train`; an RL "
                            "run keeps RLlib's checkpoints in a local folder (its last one also goes to MLflow: "
                            "log_checkpoint).")

    @classmethod
    def layer_under(cls, keys: dict[str, Any]) -> dict[str, Any]:
        """The preset for the (algo, env) the user named; its `model_args` only for the default model."""
        algo, env = keys.get("algo", "dqn"), str(keys.get("env", "CartPole-v1"))
        if algo not in ALGOS:
            raise invalid_choice("ALGO", algo, ALGOS)
        preset = ATARI_PRESET if env.startswith(ATARI_PREFIX) and algo == "dqn" else PRESETS.get((algo, env), {})
        if keys.get("model") and keys["model"] != DEFAULT_MODEL[algo]:
            preset = {k: v for k, v in preset.items() if k != MODEL_ARGS}  # those keys are the default model's
        return preset

    def registered_model(self) -> ModelSpec:
        spec = model_spec(self.model)
        if spec.task != "rl":
            fits = sorted(n for n, s in models().items() if s.task == "rl")
            raise UserError(f"--model: {self.model!r} is a {spec.task} model, not an RL policy. RL models: "
                            f"{', '.join(fits)}.")
        return spec

    def model_prefix(self) -> str:
        return f"{MODEL_ARGS}."

    def reached(self, m: dict[str, float]) -> bool:
        """Whether an iteration's metrics end the run: `timesteps` sampled or `stop_reward` reached."""
        return m["env_steps"] >= self.timesteps or (
            self.stop_reward is not None and m.get("eval_return_mean", float("-inf")) >= self.stop_reward)


# Settings that suit a known (algo, env) pair, raycraft's own. benchmarks/rl_cartpole.py and rl_pendulum.py
# measure them against Stable-Baselines3 with RL Zoo's tuned settings (docs/rl.md has the figures).
# CartPole replays one batch of 32 per env step, from 8 env copies that step together; a training step
# samples 5 steps of each (40 env steps, 1000 per iteration) and then takes its 40 gradient steps; ε decays
# over the default 10,000 env steps (over 8,000 or 12,000-16,000 the median run took longer: docs/rl.md); no
# gradient clipping: the global norm stayed under 4.2 in the four runs traced (seeds 2, 3, 6, 11; up to 32,800
# gradient steps), a tenth of the default clip of 40, so the clip changed nothing and cost a few percent of
# the run.
# Pendulum: one batch of 256 per env step, 20 env steps per training step, small (64-64) networks.
PRESETS: dict[tuple[str, str], dict[str, Any]] = {
    ("dqn", "CartPole-v1"): {
        "timesteps": 60_000, "stop_reward": 475.0, "lr": 1e-3, "batch_size": 32, "n_step": 3, "training_intensity": 32,
        "envs_per_worker": 8, "train_every": 5, "learning_starts": 1000, "replay": {"capacity": 50_000},
        "grad_clip": None, "model_args": {"hiddens": [128], "head_hiddens": [128]}, "eval_episodes": 5,
    },
    ("ddpg", "Pendulum-v1"): {
        "timesteps": 20_000, "stop_reward": -200.0, "batch_size": 256, "learning_starts": 1000,
        "training_intensity": 256, "train_every": 20, "grad_clip": None,
        "replay": {"prioritized": False, "capacity": 100_000}, "eval_episodes": 5,
        "model_args": {"actor_hiddens": [64, 64], "critic_hiddens": [64, 64]},
    },
    ("ddpg", "raycraft/Portfolio-v0"): {
        "timesteps": 20_000, "batch_size": 256, "learning_starts": 1000, "training_intensity": 256, "train_every": 20,
        "grad_clip": None, "replay": {"prioritized": False}, "ddpg": {"noise_sigma": 0.2}, "eval_episodes": 20,
    },
}
ATARI_PRESET: dict[str, Any] = {  # Nature DQN, scaled for a single machine; see docs/rl.md for the full run
    "timesteps": 10_000_000, "lr": 1e-4, "batch_size": 32, "n_step": 1, "training_intensity": 8,
    "learning_starts": 20_000, "replay": {"capacity": 100_000},
    "dqn": {"epsilon_timesteps": 250_000, "epsilon_final": 0.01, "target_update_freq": 8000},
    "steps_per_iter": 4000, "eval_interval": 10, "eval_episodes": 3,
}


def build_rl_config(base: dict[str, Any], overrides: list[str]) -> tuple[RLConfig, Any]:
    """(RLConfig, model config) from one mapping of keys (YAML, flags) and `--set` strings: `config.build`."""
    return build(RLConfig, [base], overrides)
