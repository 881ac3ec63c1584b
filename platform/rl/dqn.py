"""DQN (Mnih et al., 2015) on RLlib's new API stack, with raycraft's array replay (`raycraft.rl.replay`).

RLlib's DQN learner computes the survey's TD target with a target network θ⁻,

    y = R_t + γ^m (1 − terminated) max_a' Q(s', a'; θ⁻)        (double Q: Q(s', argmax_a' Q(s', a'; θ); θ⁻))

from the n-step rows of the replay buffer. This algorithm keeps RLlib's EnvRunners, Learner, target
updates and weight sync and changes only where batches come from: one training step samples the env,
adds the new steps to a `TransitionReplay` (which stores each frame once, in the `frame_format` of the
env), and for each update draws a batch of arrays that goes to the Learner as a `MultiAgentBatch` (so no
learner connector has to rebuild it from episodes), then writes the batch's |TD errors| back as priorities.
"""

from __future__ import annotations

import numpy as np
from ray.rllib.algorithms.dqn.dqn import DQN as RLlibDQN
from ray.rllib.algorithms.dqn.dqn import DQNConfig as RLlibDQNConfig
from ray.rllib.algorithms.dqn.dqn import calculate_rr_weights
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.execution.rollout_ops import synchronous_parallel_sample
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch
from ray.rllib.utils.metrics import (
    ALL_MODULES,
    ENV_RUNNER_RESULTS,
    ENV_RUNNER_SAMPLING_TIMER,
    LEARNER_RESULTS,
    LEARNER_UPDATE_TIMER,
    NUM_AGENT_STEPS_SAMPLED_LIFETIME,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
    SYNCH_WORKER_WEIGHTS_TIMER,
    TD_ERROR_KEY,
    TIMERS,
)
from ray.rllib.utils.numpy import convert_to_numpy

from raycraft.rl.environments import frame_format
from raycraft.rl.replay import TransitionReplay


class DQNConfig(RLlibDQNConfig):
    """RLlib's DQN settings; `replay_buffer_config` keeps RLlib's keys (type, capacity, alpha, beta)."""

    def __init__(self, algo_class: type | None = None) -> None:
        super().__init__(algo_class=algo_class or DQN)


class DQN(RLlibDQN):
    """RLlib's DQN whose training step replays from a `TransitionReplay`."""

    @classmethod
    def get_default_config(cls) -> DQNConfig:
        return DQNConfig()

    def _create_local_replay_buffer_if_necessary(self, config) -> TransitionReplay:
        replay = config["replay_buffer_config"]
        return TransitionReplay(capacity=int(replay["capacity"]), n_step=int(config["n_step"]),
                                gamma=config["gamma"], prioritized="Prioritized" in replay["type"],
                                alpha=replay.get("alpha", 0.6), beta=replay.get("beta", 0.4), seed=config["seed"],
                                frames=frame_format(config["env"]))

    def training_step(self) -> None:
        """Sample and store, then (once `num_steps_sampled_before_learning_starts` steps are in) replay and
        update, in the ratio `training_intensity` sets (RLlib's round-robin weights), then sync weights."""
        store_weight, update_weight = calculate_rr_weights(self.config)
        for _ in range(store_weight):
            with self.metrics.log_time((TIMERS, ENV_RUNNER_SAMPLING_TIMER)):
                episodes, runner_results = synchronous_parallel_sample(
                    worker_set=self.env_runner_group, concat=True, sample_timeout_s=self.config.sample_timeout_s,
                    _uses_new_env_runners=True, _return_metrics=True)
            self.metrics.aggregate(runner_results, key=ENV_RUNNER_RESULTS)
            self.local_replay_buffer.add(episodes)

        sampled = self.metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0)
        if sampled < self.config.num_steps_sampled_before_learning_starts:
            return
        timesteps = {NUM_ENV_STEPS_SAMPLED_LIFETIME: sampled,
                     NUM_AGENT_STEPS_SAMPLED_LIFETIME: self.metrics.peek(
                         (ENV_RUNNER_RESULTS, NUM_AGENT_STEPS_SAMPLED_LIFETIME), default={})}
        for _ in range(update_weight):
            batch, rows = self.local_replay_buffer.sample(self.config.total_train_batch_size)
            with self.metrics.log_time((TIMERS, LEARNER_UPDATE_TIMER)):
                results = self.learner_group.update(
                    batch=MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(batch)}, env_steps=len(rows)),
                    timesteps=timesteps)
            td_error = [convert_to_numpy(r[DEFAULT_MODULE_ID].pop(TD_ERROR_KEY).peek()) for r in results
                        if TD_ERROR_KEY in r.get(DEFAULT_MODULE_ID, {})]
            if td_error:
                self.local_replay_buffer.update_priorities(rows, np.concatenate(td_error))
            self.metrics.aggregate(results, key=LEARNER_RESULTS)

        with self.metrics.log_time((TIMERS, SYNCH_WORKER_WEIGHTS_TIMER)):
            self.env_runner_group.sync_weights(from_worker_or_learner_group=self.learner_group,
                                               policies=set(results[0]) - {ALL_MODULES}, global_vars=None,
                                               inference_only=True)
