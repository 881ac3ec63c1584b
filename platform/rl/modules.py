"""raycraft's RLModules for RLlib's new API stack: DQN Q-networks and the DDPG actor-critic.

DQN (Mnih et al., 2015) fits Q(s, a; θ) to the TD target with a target network θ⁻ (RLlib's DQN learner
computes it from `compute_q_values` and `forward_target`):

    y = r + γⁿ (1 − done) Q(s', argmax_a' Q(s', a'; θ); θ⁻)      (double Q; plain DQN: max_a' Q(s', a'; θ⁻))
    dueling head:  Q(s, a) = V(s) + A(s, a) − mean_a' A(s, a')

DDPG (Lillicrap et al., 2016): a deterministic actor μ(s) ∈ [−1, 1]ᵈ and a critic Q(s, a), each with a
target copy updated softly, θ⁻ ← τθ + (1 − τ)θ⁻. Exploration adds Gaussian or Ornstein–Uhlenbeck noise
to μ(s) in `_forward_exploration` only; inference acts with μ(s) itself.
"""

from __future__ import annotations

import abc
from typing import Any

import numpy as np
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.utils import make_target_network
from ray.rllib.core.rl_module.apis import InferenceOnlyAPI, QNetAPI, TargetNetworkAPI
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule
from ray.rllib.utils.schedules.scheduler import Scheduler
from torch import nn

from raycraft.config import to_dict

QF_PREDS = "qf_preds"  # the keys RLlib's DQN learner reads (ray.rllib.algorithms.dqn.dqn_learner)
QF_NEXT_PREDS = "qf_next_preds"
QF_TARGET_NEXT_PREDS = "qf_target_next_preds"
Q_TARGET_NEXT = "q_target_next"  # DDPG: Q(s', μ(s'; φ⁻); θ⁻)
Q_MU = "q_mu"  # DDPG: Q(s, μ(s; φ); θ) with the critic frozen, for the actor's loss


def build(module_class: type, cfg: Any, info: dict[str, Any]) -> TorchRLModule:
    """An RLModule of `module_class` for the spaces in `info`, configured by dataclass `cfg`
    (plus `info["model_config"]`, the algorithm's own keys such as the epsilon schedule)."""
    return RLModuleSpec(module_class=module_class, observation_space=info["observation_space"],
                        action_space=info["action_space"],
                        model_config={**info.get("model_config", {}), **to_dict(cfg)}).build()


def mlp(sizes: list[int], activation: type[nn.Module], out_activation: nn.Module | None = None) -> nn.Sequential:
    """Linear layers of `sizes` with `activation` between them (none after the last, unless given)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    if out_activation is not None:
        layers.append(out_activation)
    return nn.Sequential(*layers)


ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


class QModule(TorchRLModule, QNetAPI, TargetNetworkAPI, InferenceOnlyAPI):
    """Q(s, ·) for a discrete action space: a torso (subclass) and a plain or dueling head; ε-greedy exploration."""

    @abc.abstractmethod
    def make_torso(self) -> tuple[nn.Module, int]:
        """The feature extractor and its output width."""

    def setup(self) -> None:
        cfg = self.model_config
        self.dueling, self.double_q = bool(cfg["dueling"]), bool(cfg["double_q"])
        self.epsilon = Scheduler(cfg.get("epsilon", 0.0), framework="torch")
        n_actions = self.action_space.n
        self.torso, width = self.make_torso()
        head = [width, *cfg.get("head_hiddens", ())]
        act = ACTIVATIONS[cfg.get("activation", "relu")]
        self.advantage = mlp([*head, n_actions], act)
        self.value = mlp([*head, 1], act) if self.dueling else None

    def _q(self, obs: torch.Tensor, torso: nn.Module, advantage: nn.Module, value: nn.Module | None) -> torch.Tensor:
        h = torso(obs.float())                                 # (B, width)
        a = advantage(h)                                       # (B, |A|)
        if value is None:
            return a
        return value(h) + a - a.mean(dim=-1, keepdim=True)     # V(s) + A(s,a) − mean A

    def compute_q_values(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {QF_PREDS: self._q(batch[Columns.OBS], self.torso, self.advantage, self.value)}

    def make_target_networks(self) -> None:
        self._target_torso = make_target_network(self.torso)
        self._target_advantage = make_target_network(self.advantage)
        self._target_value = make_target_network(self.value) if self.dueling else None

    def get_target_network_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        pairs = [(self.torso, self._target_torso), (self.advantage, self._target_advantage)]
        return pairs + ([(self.value, self._target_value)] if self.dueling else [])

    def forward_target(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {QF_PREDS: self._q(batch[Columns.OBS], self._target_torso, self._target_advantage,
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
        obs, next_obs = batch[Columns.OBS], batch[Columns.NEXT_OBS]
        out: dict[str, Any] = {}
        if self.double_q:  # one pass over [s; s'] gives Q(s, ·) and the online argmax at s'
            q = self.compute_q_values({Columns.OBS: torch.cat([obs, next_obs])})[QF_PREDS]
            out[QF_PREDS], out[QF_NEXT_PREDS] = q.chunk(2)
        else:
            out[QF_PREDS] = self.compute_q_values({Columns.OBS: obs})[QF_PREDS]
        out[QF_TARGET_NEXT_PREDS] = self.forward_target({Columns.OBS: next_obs})[QF_PREDS]
        return out


class QMLPModule(QModule):
    """Q-network for vector observations: an MLP torso (`hiddens`, `activation`)."""

    def make_torso(self) -> tuple[nn.Module, int]:
        cfg = self.model_config
        sizes = [int(np.prod(self.observation_space.shape)), *cfg["hiddens"]]
        act = ACTIVATIONS[cfg["activation"]]
        return nn.Sequential(nn.Flatten(), mlp(sizes, act, act())), sizes[-1]


class NatureCNNQModule(QModule):
    """Q-network of Mnih et al. (2015) for (84, 84, 4) frames: conv 8×8/4 → 4×4/2 → 3×3/1, then 512 units."""

    def make_torso(self) -> tuple[nn.Module, int]:
        h, w, c = self.observation_space.shape
        convs = nn.Sequential(nn.Conv2d(c, 32, 8, stride=4), nn.ReLU(), nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
                              nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(), nn.Flatten())
        with torch.no_grad():
            flat = convs(torch.zeros(1, c, h, w)).shape[-1]    # 64·7·7 = 3136 for 84×84
        hidden = int(self.model_config.get("hidden", 512))
        return nn.Sequential(ChannelsFirst(), convs, nn.Linear(flat, hidden), nn.ReLU()), hidden


class ChannelsFirst(nn.Module):
    """(B, H, W, C) frames, as gymnasium gives them, to (B, C, H, W) for Conv2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


class DeterministicActorCriticAPI(abc.ABC):
    """What DDPG's learner needs: a deterministic actor and a critic, each an nn.Module of its own."""

    @abc.abstractmethod
    def actor_and_critic(self) -> tuple[nn.Module, nn.Module]:
        """(μ, Q): the networks the actor and critic optimizers own."""


class DDPGModule(TorchRLModule, DeterministicActorCriticAPI, QNetAPI, TargetNetworkAPI, InferenceOnlyAPI):
    """DDPG actor μ(s) = tanh(MLP(s)) in the normalised action box [−1, 1]ᵈ and critic Q(s, a) = MLP([s, a])."""

    def setup(self) -> None:
        cfg = self.model_config
        obs_dim = int(np.prod(self.observation_space.shape))
        self.act_dim = int(np.prod(self.action_space.shape))
        self.actor = mlp([obs_dim, *cfg["actor_hiddens"], self.act_dim], nn.ReLU, nn.Tanh())
        self.critic = mlp([obs_dim + self.act_dim, *cfg["critic_hiddens"], 1], nn.ReLU)
        self.noise = cfg.get("noise", "gaussian")
        self.noise_sigma = float(cfg.get("noise_sigma", 0.1))
        self.ou_theta = float(cfg.get("ou_theta", 0.15))
        self.ou_state: torch.Tensor | None = None  # x_t of the OU process, one row per vector-env slot

    def actor_and_critic(self) -> tuple[nn.Module, nn.Module]:
        return self.actor, self.critic

    @staticmethod
    def _q(critic: nn.Module, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return critic(torch.cat([obs.flatten(1).float(), actions.flatten(1).float()], dim=-1)).squeeze(-1)  # (B,)

    def compute_q_values(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {QF_PREDS: self._q(self.critic, batch[Columns.OBS], batch[Columns.ACTIONS])}

    def make_target_networks(self) -> None:
        self._target_actor = make_target_network(self.actor)
        self._target_critic = make_target_network(self.critic)

    def get_target_network_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.actor, self._target_actor), (self.critic, self._target_critic)]

    def forward_target(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        obs = batch[Columns.OBS]
        mu_target = self._target_actor(obs.flatten(1).float())
        return {QF_PREDS: self._q(self._target_critic, obs, mu_target)}

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
        out[Q_MU] = self._q(self.critic, obs, self.actor(obs.flatten(1).float()))
        for p in self.critic.parameters():
            p.requires_grad_(True)
        return out
