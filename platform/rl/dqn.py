"""DQN (Mnih et al., 2015) on RLlib's new API stack, with raycraft's array replay (`raycraft.rl.replay`).

RLlib's DQN learner computes the survey's TD target with a target network θ⁻,

    y = R_t + γ^m (1 − terminated) max_a' Q(s', a'; θ⁻)        (double Q: Q(s', argmax_a' Q(s', a'; θ); θ⁻))

from the n-step rows of the replay buffer. This algorithm keeps RLlib's EnvRunners, Learner, target
updates and weight sync and changes where batches come from and how many a Learner call takes: one
training step samples the env (`rollout_fragment_length` steps per env copy, raycraft's `train_every`),
adds the new steps to a `TransitionReplay` (which stores each frame once, in the `frame_format` of the
env), draws one batch of arrays per gradient step that `training_intensity` asks for, and hands them all
to the Learner in one call as a `MultiAgentBatch` (no learner connector rebuilds them from episodes;
`BatchStepsLearner` takes one gradient step per batch); then it writes the batches' |TD errors| back as
priorities and syncs the EnvRunners' weights once.

Per env step, RLlib's per-call work (the batch's conversion to tensors, the metrics, a weight sync through
the object store) cost more than the gradient step itself on CartPole and Pendulum; a training step of
many env steps and gradient steps pays it once.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from ray.rllib.algorithms.dqn.dqn import DQN as RLlibDQN
from ray.rllib.algorithms.dqn.dqn import DQNConfig as RLlibDQNConfig
from ray.rllib.algorithms.dqn.dqn_learner import QF_LOSS_KEY
from ray.rllib.algorithms.dqn.torch.dqn_torch_learner import DQNTorchLearner as RLlibDQNTorchLearner
from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_RL_MODULE, DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
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
    WEIGHTS_SEQ_NO,
)
from ray.rllib.utils.torch_utils import clip_gradients
from torch.nn import functional as F

from raycraft.rl.environments import frame_format
from raycraft.rl.modules import QF_NEXT_PREDS, QF_PREDS, QF_TARGET_NEXT_PREDS
from raycraft.rl.replay import TransitionReplay

log = logging.getLogger(__name__)


class DQNConfig(RLlibDQNConfig):
    """RLlib's DQN settings; `replay_buffer_config` keeps RLlib's keys (type, capacity, alpha, beta)."""

    def __init__(self, algo_class: type | None = None) -> None:
        super().__init__(algo_class=algo_class or DQN)
        # RLlib checks each gradient tensor twice per step, with a host sync each; `FiniteStepAdam` checks on
        # the device.
        self.torch_skip_nan_gradients = True

    def get_default_learner_class(self) -> type:
        return DQNTorchLearner


class FiniteStepAdam(torch.optim.Adam):
    """torch's fused Adam (one kernel per step instead of several per tensor: a third of the optimizer's time on
    the small networks here, CPU) that skips any step whose gradients hold a NaN or an inf (RLlib's
    `torch_skip_nan_gradients`) without a host-side test: one fused check sets `found_inf`, which the fused
    kernel reads as it does for torch's GradScaler (a global norm and its `isfinite` took 4x as long).
    `skipped` counts the skipped steps, on the device.

    After the first step, which creates the state, a step calls the fused kernel itself: torch's `step` spends
    as long again finding the state and dispatching (step hooks, which nothing here registers, do not run)."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        super().__init__(params, fused=True)
        self.found_inf: torch.Tensor | None = None  # 1.0 when this step's gradients are not finite
        self.skipped: torch.Tensor | None = None
        self.unit: torch.Tensor | None = None  # the check's gradient scale: none

    def step(self, closure: Callable | None = None) -> Any:
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        if grads:
            self.check_finite(grads)
        if closure is not None or len(self.param_groups) > 1 or not params or any(p not in self.state for p in params):
            return super().step(closure)
        group, states = self.param_groups[0], [self.state[p] for p in params]
        steps = [state["step"] for state in states]
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(params, grads, [state["exp_avg"] for state in states],
                           [state["exp_avg_sq"] for state in states], [], steps, amsgrad=False, lr=group["lr"],
                           beta1=group["betas"][0], beta2=group["betas"][1], weight_decay=group["weight_decay"],
                           eps=group["eps"], maximize=group["maximize"], found_inf=self.found_inf)
        torch._foreach_sub_(steps, [self.found_inf] * len(steps))  # a skipped step does not count
        return None

    def check_finite(self, grads: list[torch.Tensor]) -> None:
        if self.found_inf is None:
            device = grads[0].device
            self.found_inf, self.skipped = torch.zeros((), device=device), torch.zeros((), device=device)
            self.unit = torch.ones((), device=device)
        self.found_inf.zero_()
        torch._amp_foreach_non_finite_check_and_unscale_(grads, self.found_inf, self.unit)
        self.skipped += self.found_inf

    def take_skipped(self) -> int:
        """Steps skipped since the last call."""
        if self.skipped is None:
            return 0
        count = int(self.skipped.item())
        self.skipped.zero_()
        return count


def clip_by_global_norm(gradients_dict: dict, *, grad_clip: float, grad_clip_by: str) -> torch.Tensor | None:
    """RLlib's `clip_gradients` (in place; returns the global norm for "global_norm"), with the global norm in
    one batched kernel instead of one Python-level norm per tensor."""
    if grad_clip_by != "global_norm":
        return clip_gradients(gradients_dict, grad_clip=grad_clip, grad_clip_by=grad_clip_by)
    grads = [g for g in gradients_dict.values() if g is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    scale = (grad_clip / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale)
    return norm


def round_robin(config: RLlibDQNConfig) -> tuple[int, int]:
    """(sampling rounds, gradient steps) per training step for `training_intensity` transitions replayed per
    transition sampled. RLlib's `calculate_rr_weights` counts the driver's EnvRunner among the samplers even
    when remote EnvRunners do all the sampling, which doubles the gradient steps with one of them."""
    if not config.training_intensity:
        return 1, 1
    sampled = (config.get_rollout_fragment_length() * config.num_envs_per_env_runner
               * max(config.num_env_runners, 1))
    weight = config.training_intensity * sampled / config.total_train_batch_size
    return (int(np.round(1 / weight)), 1) if weight < 1 else (1, int(np.round(weight)))


class DeferredMetrics:
    """Stands in for a Learner's MetricsLogger during the gradient steps of a call before its last: keeps the
    values logged to be reduced over the steps (each step's TD errors, which the replay's priorities need)
    for `replay` and drops the single values (window=1: the loss, the Q statistics, the gradient norm), which
    the last step logs again. Anything else goes to the real logger."""

    def __init__(self, metrics: Any) -> None:
        self.metrics, self.calls = metrics, []

    def log_value(self, *args, **kwargs) -> None:
        if kwargs.get("window") != 1:
            self.calls.append(("log_value", args, kwargs))

    def log_dict(self, *args, **kwargs) -> None:
        if kwargs.get("window") != 1:
            self.calls.append(("log_dict", args, kwargs))

    def replay(self) -> None:
        for name, args, kwargs in self.calls:
            getattr(self.metrics, name)(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.metrics, name)


class BatchStepsLearner(TorchLearner):
    """A torch Learner that takes one gradient step per `train_batch_size_per_learner` rows of each batch it
    is given: `DQN.learn` hands over all of a training step's replayed batches at once, so what RLlib's
    Learner does once per call (turning the batch into tensors, reducing its metrics, the target update)
    happens once per training step instead of once per gradient step, and the single-value metrics are
    logged by the last step only (`DeferredMetrics`). Its optimizers are `FiniteStepAdam`s; a call warns
    once of the steps they skipped."""

    def _update(self, batch: dict[str, Any]) -> tuple[Any, Any, Any]:
        size = self.config.train_batch_size_per_learner
        starts = range(0, len(next(iter(batch.values()))), size)
        deferred = DeferredMetrics(self.metrics)
        self.metrics = deferred
        try:
            for start in starts[:-1]:
                super()._update(self._rows(batch, start, size))
        finally:
            self.metrics = deferred.metrics
        deferred.replay()
        results = super()._update(self._rows(batch, starts[-1], size))
        self.warn_skipped_steps()
        return results

    def warn_skipped_steps(self) -> None:
        skipped = sum(optim.take_skipped() for module_id in self.module.keys()
                      for _, optim in self.get_optimizers_for_module(module_id))
        if skipped:
            log.warning("Skipped %d of this call's gradient steps: their gradients are not finite (NaN or inf).",
                        skipped)

    @staticmethod
    def _rows(batch: dict[str, Any], start: int, size: int) -> dict[str, Any]:
        return {module_id: {key: value[start:start + size] for key, value in columns.items()}
                for module_id, columns in batch.items()}

    @staticmethod
    def _get_clip_function() -> Callable:
        return clip_by_global_norm


def td_loss(batch: dict[str, Any], fwd_out: dict[str, torch.Tensor], gamma: float, double_q: bool,
            loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, |TD error|) of one replay batch: the module docstring's target y with m = `n_step` and the
    importance weights w of prioritised replay,

        loss = mean_i w_i ℓ(Q(s_i, a_i; θ) − y_i),    ℓ = Huber (δ = 1) or the square.
    """
    q = fwd_out[QF_PREDS].gather(-1, batch[Columns.ACTIONS].long().unsqueeze(-1)).squeeze(-1)  # (B,)
    q_next = batch[QF_TARGET_NEXT_PREDS]  # Q(s', ·; θ⁻) (B, |A|): `DQNTorchLearner.add_target_values`
    best = (fwd_out[QF_NEXT_PREDS] if double_q else q_next).argmax(-1, keepdim=True)  # a' (B, 1)
    not_done = 1.0 - batch[Columns.TERMINATEDS].float()
    y = (batch[Columns.REWARDS] + gamma ** batch["n_step"] * not_done * q_next.gather(-1, best).squeeze(-1)).detach()
    per_row = F.huber_loss(q, y, reduction="none") if loss == "huber" else (q - y) ** 2
    return torch.mean(batch["weights"] * per_row), (q - y).abs().detach()


class DQNTorchLearner(BatchStepsLearner, RLlibDQNTorchLearner):
    """RLlib's DQN learner, one gradient step per batch of a call (`BatchStepsLearner`), with `td_loss`.
    RLlib's own loss (an eighth of a CartPole gradient step) also serves distributional heads, masks and
    burn-in, and logs Q's min and max; `td_loss` takes 4% less of the step."""

    def _update(self, batch: dict[str, Any]) -> tuple[Any, Any, Any]:
        self.add_target_values(batch)
        return super()._update(batch)

    def add_target_values(self, batch: dict[str, Any]) -> None:
        """Each module's Q(s', ·; θ⁻) (rows, |A|) as the column `QF_TARGET_NEXT_PREDS` of its batch, for all
        the gradient steps of a call in one pass: θ⁻ changes only between calls (`after_gradient_based_update`),
        and one pass over a few thousand rows costs little more than one over 32."""
        for module_id, columns in batch.items():
            with torch.no_grad():
                columns[QF_TARGET_NEXT_PREDS] = self.module[module_id].unwrapped().forward_target(
                    {Columns.OBS: columns[Columns.NEXT_OBS]})[QF_PREDS]

    def compute_loss_for_module(self, *, module_id: str, config: RLlibDQNConfig, batch: dict[str, Any],
                                fwd_out: dict[str, Any]) -> torch.Tensor:
        loss, td_error = td_loss(batch, fwd_out, config.gamma, config.double_q, config.td_error_loss_fn)
        self.metrics.log_value(key=(module_id, TD_ERROR_KEY), value=td_error, reduce="item_series")
        self.metrics.log_value(key=(module_id, QF_LOSS_KEY), value=loss, window=1)
        return loss

    def configure_optimizers_for_module(self, module_id: str, config: RLlibDQNConfig = None) -> None:
        params = [p for p in self.get_parameters(self._module[module_id]) if p.requires_grad]  # not θ⁻
        self.register_optimizer(module_id=module_id, optimizer=FiniteStepAdam(params), params=params,
                                lr_or_lr_schedule=config.lr)


SAMPLE_TAG = "raycraft-sample"


def sample_rounds(sampled: int, rounds: int, runner) -> tuple[list, dict]:
    """On an EnvRunner: (episodes, metrics) of `rounds` sample calls, ε set for `sampled` env steps first
    (`DQN.sync_env_steps`)."""
    runner.set_state({NUM_ENV_STEPS_SAMPLED_LIFETIME: sampled})
    return [e for _ in range(rounds) for e in runner.sample()], runner.get_metrics()


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
        """Sample and store, then (once `num_steps_sampled_before_learning_starts` steps are in) make the
        gradient steps that `training_intensity` asks for (RLlib's round-robin weights) in one Learner call,
        and sync the EnvRunners' weights once. With remote EnvRunners, once learning has started, they sample
        while the Learner learns (`overlapped_step`)."""
        store_weight, update_weight = round_robin(self.config)
        if self.learning() and self.env_runner_group.num_remote_env_runners():
            results = self.overlapped_step(self.sampled(), store_weight, update_weight)
        else:
            self.sync_env_steps()
            for _ in range(store_weight):
                with self.metrics.log_time((TIMERS, ENV_RUNNER_SAMPLING_TIMER)):
                    episodes, runner_results = synchronous_parallel_sample(
                        worker_set=self.env_runner_group, concat=True, sample_timeout_s=self.config.sample_timeout_s,
                        _uses_new_env_runners=True, _return_metrics=True)
                self.store(episodes, runner_results)
            if not self.learning():
                return
            results = self.timed_learn(update_weight, self.sampled())
        with self.metrics.log_time((TIMERS, SYNCH_WORKER_WEIGHTS_TIMER)):
            self.sync_weights(set(results[0]) - {ALL_MODULES})

    def overlapped_step(self, sampled: int, rounds: int, steps: int) -> list[dict]:
        """The remote EnvRunners sample `rounds` times each, with the weights of the last sync, while the
        Learner makes its `steps` gradient steps on what the replay held before; then their episodes are
        stored. Sampling leaves the Learner's critical path; the only change to what it learns from is that
        a training step's own transitions wait for the next one (a few dozen of the buffer's thousands)."""
        self.env_runner_group.foreach_env_runner_async(functools.partial(sample_rounds, sampled, rounds),
                                                       tag=SAMPLE_TAG)
        results = self.timed_learn(steps, sampled)
        with self.metrics.log_time((TIMERS, ENV_RUNNER_SAMPLING_TIMER)):
            replies = self.env_runner_group.fetch_ready_async_reqs(tags=SAMPLE_TAG,
                                                                   timeout_seconds=self.config.sample_timeout_s)
        self.store([e for _, (episodes, _) in replies for e in episodes], [m for _, (_, m) in replies])
        return results

    def sync_weights(self, policies: set[str]) -> None:
        """RLlib's weight sync from the Learner to the EnvRunners; with no remote EnvRunners, straight into the
        local one. RLlib's puts the weights into the object store for remote EnvRunners even when there are
        none: 1.95 against 0.18 ms a sync, 4% of a CartPole training step."""
        if self.env_runner_group.num_remote_env_runners():
            self.env_runner_group.sync_weights(from_worker_or_learner_group=self.learner_group, policies=policies,
                                               global_vars=None, inference_only=True)
            return
        state = self.learner_group.get_state(
            components=[f"{COMPONENT_LEARNER}/{COMPONENT_RL_MODULE}/{policy}" for policy in policies],
            inference_only=True)[COMPONENT_LEARNER]
        self.env_runner.set_state({key: state[key] for key in (COMPONENT_RL_MODULE, WEIGHTS_SEQ_NO) if key in state})

    def sampled(self) -> int:
        """Env steps sampled so far."""
        return self.metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0)

    def learning(self) -> bool:
        """Whether `num_steps_sampled_before_learning_starts` env steps are in."""
        return self.sampled() >= self.config.num_steps_sampled_before_learning_starts

    def store(self, episodes: list, runner_results: list[dict]) -> None:
        self.metrics.aggregate(runner_results, key=ENV_RUNNER_RESULTS)
        self.local_replay_buffer.add(episodes)

    def timed_learn(self, steps: int, sampled: int) -> list[dict]:
        with self.metrics.log_time((TIMERS, LEARNER_UPDATE_TIMER)):
            results = self.learn(steps, {
                NUM_ENV_STEPS_SAMPLED_LIFETIME: sampled,
                NUM_AGENT_STEPS_SAMPLED_LIFETIME: self.metrics.peek(
                    (ENV_RUNNER_RESULTS, NUM_AGENT_STEPS_SAMPLED_LIFETIME), default={})})
        self.metrics.aggregate(results, key=LEARNER_RESULTS)
        return results

    def sync_env_steps(self) -> None:
        """Give each EnvRunner the env steps sampled so far, which its exploration schedule (ε) reads. RLlib
        gives them once per iteration, so ε decayed up to `steps_per_iter` env steps late (1000 on CartPole's
        preset)."""
        sampled = self.sampled()
        self.env_runner_group.foreach_env_runner(
            lambda runner: runner.set_state({NUM_ENV_STEPS_SAMPLED_LIFETIME: sampled}))

    def learn(self, steps: int, timesteps: dict) -> list[dict]:
        """`steps` gradient steps in one Learner call, each on a batch replayed on its own (a prioritised
        draw is stratified per batch); then the batches' |TD errors| go back to the replay as priorities."""
        size = self.config.total_train_batch_size
        batch, rows = self.local_replay_buffer.sample(size, batches=steps)
        results = self.learner_group.update(
            batch=MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(batch)}, env_steps=steps * size),
            timesteps=timesteps)
        td_error = [torch.as_tensor(e).detach().flatten() for r in results
                    if TD_ERROR_KEY in r.get(DEFAULT_MODULE_ID, {})
                    for e in r[DEFAULT_MODULE_ID].pop(TD_ERROR_KEY).peek()]  # one per gradient step
        if td_error and self.local_replay_buffer.prioritized:
            self.local_replay_buffer.update_priorities(rows, torch.cat(td_error).numpy())
        return results
