"""DDPG (Lillicrap et al., 2016) as an RLlib algorithm on the new API stack; RLlib 2.60 ships none.

It reuses what RLlib's SAC reuses: DQN's training step (here raycraft's: sample → array replay, uniform or
prioritised → one learner call of several gradient steps → weight sync) and DQN's learner base, which builds
the target networks. This file adds the config, the two optimizers, the two losses, and the soft target
update θ⁻ ← τθ + (1 − τ)θ⁻ after every gradient step:

    critic:  L(θ) = E[ w · (Q(s, a; θ) − y)² ],   y = r + γⁿ (1 − done) Q(s', μ(s'; φ⁻); θ⁻)
    actor:   L(φ) = −E[ Q(s, μ(s; φ); θ) ]        (deterministic policy gradient ∇_a Q · ∇_φ μ)

w are the prioritised-replay importance weights (all 1 for uniform replay).
"""

from __future__ import annotations

from typing import Any

import torch
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
from ray.rllib.algorithms.dqn.dqn_learner import DQNLearner
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.learner import POLICY_LOSS_KEY
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.core.rl_module.apis import QNetAPI, TargetNetworkAPI
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.metrics import ALL_MODULES, TD_ERROR_KEY
from ray.tune.registry import register_trainable

from raycraft.models.rl import DDPGMLPConfig
from raycraft.rl.dqn import DQN, BatchStepsLearner, DQNConfig, FiniteStepAdam
from raycraft.rl.modules import Q_MU, Q_TARGET_NEXT, QF_PREDS, DDPGModule, DeterministicActorCriticAPI, module_config

QF_LOSS_KEY = "qf_loss"
ALGO_NAME = "raycraft-DDPG"


class DDPGConfig(DQNConfig):
    """DQN's replay and training-step settings plus DDPG's own: learning rates, τ, exploration noise."""

    def __init__(self, algo_class: type | None = None) -> None:
        super().__init__(algo_class=algo_class or DDPG)
        self.actor_lr = 1e-3
        self.critic_lr = 1e-3
        self.lr = None  # the two rates above replace it
        self.tau = 0.005
        self.noise = "gaussian"
        self.noise_sigma = 0.1
        self.ou_theta = 0.15
        self.grad_clip = None
        self.train_batch_size_per_learner = 256
        self.num_steps_sampled_before_learning_starts = 1000
        self.replay_buffer_config = {"type": "EpisodeReplayBuffer", "capacity": 100_000}

    def training(self, *, actor_lr: float = NotProvided, critic_lr: float = NotProvided, noise: str = NotProvided,
                 noise_sigma: float = NotProvided, ou_theta: float = NotProvided, **kwargs) -> DDPGConfig:
        super().training(**kwargs)
        for key, value in (("actor_lr", actor_lr), ("critic_lr", critic_lr), ("noise", noise),
                           ("noise_sigma", noise_sigma), ("ou_theta", ou_theta)):
            if value is not NotProvided:
                setattr(self, key, value)
        return self

    def validate(self) -> None:
        super().validate()
        if self.noise not in ("gaussian", "ou"):
            self._value_error(f"`noise` must be 'gaussian' or 'ou', got {self.noise!r}")

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=DDPGModule, model_config=module_config("ddpg_mlp", DDPGMLPConfig()))

    def get_default_learner_class(self) -> type:
        return DDPGTorchLearner

    @property
    def _model_config_auto_includes(self) -> dict[str, Any]:
        return AlgorithmConfig._model_config_auto_includes.fget(self) | {
            "noise": self.noise, "noise_sigma": self.noise_sigma, "ou_theta": self.ou_theta}


class DDPG(DQN):
    """DDPG: DQN's training step (replay, learner update, target update, weight sync) with DDPG's learner."""

    @classmethod
    def get_default_config(cls) -> DDPGConfig:
        return DDPGConfig()


class DDPGTorchLearner(BatchStepsLearner, DQNLearner, TorchLearner):
    """Two Adam optimizers (actor, critic), the losses above, and each optimizer's gradients from its own loss."""

    def build(self) -> None:
        super().build()
        self._temp_losses: dict[tuple[str, str], torch.Tensor] = {}

    @classmethod
    def rl_module_required_apis(cls) -> list[type]:
        return [DeterministicActorCriticAPI, QNetAPI, TargetNetworkAPI]

    def configure_optimizers_for_module(self, module_id: str, config: DDPGConfig = None) -> None:
        actor, critic = self._module[module_id].unwrapped().actor_and_critic()
        for name, net, lr in (("actor", actor, config.actor_lr), ("critic", critic, config.critic_lr)):
            params = self.get_parameters(net)
            self.register_optimizer(module_id=module_id, optimizer_name=name, optimizer=FiniteStepAdam(params),
                                    params=params, lr_or_lr_schedule=lr)

    def compute_loss_for_module(self, *, module_id: str, config: DDPGConfig, batch: dict[str, Any],
                                fwd_out: dict[str, Any]) -> torch.Tensor:
        critic_loss, actor_loss, td_error = ddpg_losses(batch, fwd_out, config.gamma)
        self.metrics.log_value(key=(module_id, TD_ERROR_KEY), value=td_error, reduce="item_series")
        self.metrics.log_dict({QF_LOSS_KEY: critic_loss, POLICY_LOSS_KEY: actor_loss,
                               "qf_mean": fwd_out[QF_PREDS].mean(), "td_error_mean": td_error.mean()},
                              key=module_id, window=1)
        self._temp_losses[(module_id, "actor")] = actor_loss
        self._temp_losses[(module_id, "critic")] = critic_loss
        return critic_loss + actor_loss

    def apply_gradients(self, gradients_dict: dict) -> None:
        """Each optimizer's step, then θ⁻ ← τθ + (1 − τ)θ⁻ for each target network: after every gradient step,
        however many one Learner call makes (DQN's learner would update once per call)."""
        super().apply_gradients(gradients_dict)
        with torch.no_grad():
            for module_id in self.module.keys():
                tau = self.config.get_config_for_module(module_id).tau
                for main, target in self.module[module_id].unwrapped().get_target_network_pairs():
                    for p, p_target in zip(main.parameters(), target.parameters(), strict=True):
                        p_target.lerp_(p, tau)

    def after_gradient_based_update(self, *, timesteps: dict[str, Any]) -> None:
        """TorchLearner's (learning-rate schedules) without DQN's target update: `apply_gradients` does it."""
        super(DQNLearner, self).after_gradient_based_update(timesteps=timesteps)

    def compute_gradients(self, loss_per_module: dict[str, torch.Tensor], **kwargs) -> dict:
        grads = {}
        for module_id in set(loss_per_module) - {ALL_MODULES}:
            for name, optim in self.get_optimizers_for_module(module_id):
                optim.zero_grad(set_to_none=True)
                self._temp_losses.pop((module_id, name)).backward(retain_graph=True)
                grads.update({pid: p.grad for pid, p in self.filter_param_dict_for_optimizer(self._params,
                                                                                            optim).items()})
        return grads


def ddpg_losses(batch: dict[str, Any], fwd_out: dict[str, Any], gamma: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(critic loss, actor loss, |TD error|) of the module docstring, for one replay batch."""
    not_done = 1.0 - batch[Columns.TERMINATEDS].float()
    y = (batch[Columns.REWARDS] + gamma ** batch["n_step"] * not_done * fwd_out[Q_TARGET_NEXT]).detach()
    q = fwd_out[QF_PREDS]
    weights = batch.get("weights", torch.ones_like(q))
    critic_loss = torch.mean(weights * (q - y) ** 2)
    actor_loss = -torch.mean(fwd_out[Q_MU])
    return critic_loss, actor_loss, torch.abs(q - y).detach()


def register() -> None:
    """Make DDPG nameable by Tune (`tune.Tuner("raycraft-DDPG", ...)`)."""
    register_trainable(ALGO_NAME, DDPG)
