"""raycraft's RLModules for RLlib's new API stack: DQN around a `QNetwork`, DDPG around an `ActorCritic`.

The networks are plain torch modules registered in `raycraft.models.rl`. An RLModule builds the one its
`model_config["model"]` names (`network`) and adds what RLlib's learners need: the target copies θ⁻, the
forward passes of training, exploration and inference, and the APIs the learners check. The network's
parts become the module's own attributes (`torso`, `advantage`, `value`; `actor`, `critic`), so the
tensors of a logged policy (`policy/weights.pt`) and of a checkpoint keep their names.

DQN (Mnih et al., 2015) fits Q(s, a; θ) to the TD target with a target network θ⁻ (raycraft's DQN learner
computes it from `compute_q_values` and `forward_target`):

    y = r + γⁿ (1 − done) Q(s', argmax_a' Q(s', a'; θ); θ⁻)      (double Q; plain DQN: max_a' Q(s', a'; θ⁻))
    dueling head:  Q(s, a) = V(s) + A(s, a) − mean_a' A(s, a')

DDPG (Lillicrap et al., 2016): a deterministic actor μ(s) ∈ [−1, 1]ᵈ and a critic Q(s, a), each with a
target copy updated softly, θ⁻ ← τθ + (1 − τ)θ⁻. Exploration adds Gaussian or Ornstein–Uhlenbeck noise
to μ(s) in `_forward_exploration` only; inference acts with μ(s) itself.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import gymnasium as gym
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.utils import make_target_network
from ray.rllib.core.rl_module.apis import InferenceOnlyAPI, QNetAPI, TargetNetworkAPI
from ray.rllib.core.rl_module.rl_module import RLModule
from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule
from ray.rllib.utils.schedules.scheduler import Scheduler
from torch import nn

from raycraft.config import to_dict
from raycraft.errors import UserError
from raycraft.models.rl import ActorCritic, QNetwork, critic_value, q_values
from raycraft.registry import create_model, model_spec

QF_PREDS = "qf_preds"  # the keys RLlib's DQN learner reads (ray.rllib.algorithms.dqn.dqn_learner)
QF_NEXT_PREDS = "qf_next_preds"
QF_TARGET_NEXT_PREDS = "qf_target_next_preds"  # a batch column: `DQNTorchLearner.add_target_values`
Q_TARGET_NEXT = "q_target_next"  # DDPG: Q(s', μ(s'; φ⁻); θ⁻)
Q_MU = "q_mu"  # DDPG: Q(s, μ(s; φ); θ) with the critic frozen, for the actor's loss


def module_config(model: str, cfg: Any) -> dict[str, Any]:
    """An RLModule's `model_config` for the registered network `model` with config dataclass `cfg`
    (RLlib adds the algorithm's own keys, such as the ε schedule or the noise, when it builds the module)."""
    return {"model": model, **to_dict(cfg)}


def network(module: RLModule) -> nn.Module:
    """The registered network that `module.model_config` names, built for the module's spaces from the
    config fields found there (the algorithm's keys are not the network's)."""
    cfg = module.model_config
    spec = model_spec(cfg["model"])
    args = spec.config_cls(**{f.name: cfg[f.name] for f in dataclasses.fields(spec.config_cls) if f.name in cfg})
    return create_model(spec.name, args, {"observation_space": module.observation_space,
                                          "action_space": module.action_space})


class ModeSwitchingModule(TorchRLModule):
    """A TorchRLModule that switches between train and eval mode only when the kind of pass changes.
    TorchRLModule sets the mode on every call (an acting pass sets eval and then train back), and each
    switch walks every submodule: a tenth of a small network's gradient step, twice per env step."""

    def forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        if not self.training:
            self.train()
        return RLModule.forward_train(self, batch, **kwargs)

    def forward_exploration(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        if self.training:
            self.eval()
        return RLModule.forward_exploration(self, batch, **kwargs)

    def forward_inference(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        if self.training:
            self.eval()
        return RLModule.forward_inference(self, batch, **kwargs)


class QModule(ModeSwitchingModule, QNetAPI, TargetNetworkAPI, InferenceOnlyAPI):
    """DQN's RLModule around a `QNetwork` Q(s, ·): its target copy, ε-greedy exploration, greedy inference."""

    def setup(self) -> None:
        self.double_q = bool(self.model_config["double_q"])
        self.epsilon = Scheduler(self.model_config.get("epsilon", 0.0), framework="torch")
        q: QNetwork = network(self)
        self.torso, self.advantage, self.value = q.torso, q.advantage, q.value
        self.dueling = self.value is not None

    def compute_q_values(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {QF_PREDS: q_values(batch[Columns.OBS], self.torso, self.advantage, self.value)}

    def make_target_networks(self) -> None:
        self._target_torso = make_target_network(self.torso)
        self._target_advantage = make_target_network(self.advantage)
        self._target_value = make_target_network(self.value) if self.dueling else None

    def get_target_network_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        pairs = [(self.torso, self._target_torso), (self.advantage, self._target_advantage)]
        return pairs + ([(self.value, self._target_value)] if self.dueling else [])

    def forward_target(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {QF_PREDS: q_values(batch[Columns.OBS], self._target_torso, self._target_advantage,
                                   self._target_value)}

    def get_non_inference_attributes(self) -> list[str]:
        return ["_target_torso", "_target_advantage", "_target_value"]

    def _forward_inference(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return {Columns.ACTIONS: self.compute_q_values(batch)[QF_PREDS].argmax(dim=-1)}

    def _forward_exploration(self, batch: dict[str, Any], t: int = 0, **kwargs) -> dict[str, Any]:
        greedy = self._forward_inference(batch)[Columns.ACTIONS]
        self.epsilon.update(t)
        eps = float(self.epsilon.get_current_value())
        random = torch.randint(0, self.action_space.n, greedy.shape, device=greedy.device)
        explore = torch.rand(greedy.shape, device=greedy.device) < eps
        return {Columns.ACTIONS: torch.where(explore, random, greedy)}

    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        """Q(s, ·; θ), and for double Q the online Q(s', ·; θ) that picks a', outside the graph (a pass over
        [s; s'] would carry s' through the backward pass). The target's Q(s', ·; θ⁻) is the learner's to
        compute: θ⁻ stays fixed over a Learner call, so `DQNTorchLearner` makes one pass for all its batches."""
        out = {QF_PREDS: self.compute_q_values({Columns.OBS: batch[Columns.OBS]})[QF_PREDS]}
        if self.double_q:
            with torch.no_grad():
                out[QF_NEXT_PREDS] = self.compute_q_values({Columns.OBS: batch[Columns.NEXT_OBS]})[QF_PREDS]
        return out


class DeterministicActorCriticAPI(abc.ABC):
    """What DDPG's learner needs: a deterministic actor and a critic, each an nn.Module of its own."""

    @abc.abstractmethod
    def actor_and_critic(self) -> tuple[nn.Module, nn.Module]:
        """(μ, Q): the networks the actor and critic optimizers own."""


class DDPGModule(ModeSwitchingModule, DeterministicActorCriticAPI, QNetAPI, TargetNetworkAPI, InferenceOnlyAPI):
    """DDPG's RLModule around an `ActorCritic`: target copies of μ and Q, exploration noise on μ(s)."""

    def setup(self) -> None:
        cfg = self.model_config
        nets: ActorCritic = network(self)
        self.actor, self.critic = nets.actor, nets.critic
        self.noise = cfg.get("noise", "gaussian")
        self.noise_sigma = float(cfg.get("noise_sigma", 0.1))
        self.ou_theta = float(cfg.get("ou_theta", 0.15))
        self.ou_state: torch.Tensor | None = None  # x_t of the OU process, one row per vector-env slot

    def actor_and_critic(self) -> tuple[nn.Module, nn.Module]:
        return self.actor, self.critic

    def compute_q_values(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {QF_PREDS: critic_value(self.critic, batch[Columns.OBS], batch[Columns.ACTIONS])}

    def make_target_networks(self) -> None:
        self._target_actor = make_target_network(self.actor)
        self._target_critic = make_target_network(self.critic)

    def get_target_network_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.actor, self._target_actor), (self.critic, self._target_critic)]

    def forward_target(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        obs = batch[Columns.OBS]
        mu_target = self._target_actor(obs.flatten(1).float())
        return {QF_PREDS: critic_value(self._target_critic, obs, mu_target)}

    def get_non_inference_attributes(self) -> list[str]:
        return ["critic", "_target_actor", "_target_critic"]

    def _forward_inference(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return {Columns.ACTIONS: self.actor(batch[Columns.OBS].flatten(1).float())}

    def sample_noise(self, shape: torch.Size) -> torch.Tensor:
        """Gaussian: σ ε.  Ornstein–Uhlenbeck (dt = 1, mean 0): x ← x − θ x + σ ε, kept across steps."""
        eps = torch.randn(shape)
        if self.noise == "gaussian":
            return self.noise_sigma * eps
        if self.ou_state is None or self.ou_state.shape != shape:
            self.ou_state = torch.zeros(shape)
        self.ou_state = self.ou_state - self.ou_theta * self.ou_state + self.noise_sigma * eps
        return self.ou_state

    def _forward_exploration(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        mu = self._forward_inference(batch)[Columns.ACTIONS]
        return {Columns.ACTIONS: (mu + self.sample_noise(mu.shape).to(mu.device)).clamp(-1.0, 1.0)}

    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        obs = batch[Columns.OBS]
        out = {QF_PREDS: self.compute_q_values(batch)[QF_PREDS]}
        with torch.no_grad():
            out[Q_TARGET_NEXT] = self.forward_target({Columns.OBS: batch[Columns.NEXT_OBS]})[QF_PREDS]
        # The actor's loss −Q(s, μ(s)) must move μ only: freeze the critic while the graph is built
        # (the learner also collects each optimizer's gradients separately, as RLlib's SAC does).
        for p in self.critic.parameters():
            p.requires_grad_(False)
        out[Q_MU] = critic_value(self.critic, obs, self.actor(obs.flatten(1).float()))
        for p in self.critic.parameters():
            p.requires_grad_(True)
        return out


class GreedyPolicy(nn.Module):
    """An RLModule's greedy policy as a plain torch module: observations (B, *observation shape), float32, to
    actions in the env's own units, what `env.step` takes: DQN's action indices (int64, (B,)), DDPG's μ(s)
    scaled from [−1, 1]ᵈ to the action box [low, high] (float32, (B, d)), as RLlib's connector unsquashes it.
    `rl-eval` plays it, and MLflow serves it (a torch.export graph of it is the run's model)."""

    def __init__(self, module: TorchRLModule) -> None:
        super().__init__()
        self.module = module
        space = module.action_space
        self.box = isinstance(space, gym.spaces.Box)
        if self.box:
            self.register_buffer("low", torch.as_tensor(space.low, dtype=torch.float32))
            self.register_buffer("high", torch.as_tensor(space.high, dtype=torch.float32))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        actions = self.module.forward_inference({Columns.OBS: obs})[Columns.ACTIONS]
        if not self.box:
            return actions
        return self.low + (actions + 1.0) * 0.5 * (self.high - self.low)


MODULES: dict[type, type[TorchRLModule]] = {QNetwork: QModule, ActorCritic: DDPGModule}
"""The RLModule that trains each kind of network."""


def module_class(net: nn.Module) -> type[TorchRLModule]:
    """The RLModule class for a network built by a registered RL model."""
    for kind, cls in MODULES.items():
        if isinstance(net, kind):
            return cls
    raise UserError(f"--model: {type(net).__name__} is none of the networks raycraft's RL algorithms train "
                    f"({', '.join(k.__name__ for k in MODULES)}).")
