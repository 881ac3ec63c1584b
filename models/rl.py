"""RL policies and value networks as plain torch modules, registered by name (family `rl`, task `rl`) for
`raycraft rl --model`.

Each builder takes `info["observation_space"]` and `info["action_space"]` (gymnasium spaces, read by
their `shape` and `n`) and returns the network; `raycraft.rl.modules` wraps it in the RLlib RLModule its
algorithm trains (a `QNetwork` in DQN's, an `ActorCritic` in DDPG's), so nothing here needs RLlib.

DQN (Mnih et al., 2015) fits Q(s, a; θ) to the TD target of a target network θ⁻,

    y = r + γⁿ (1 − done) max_a' Q(s', a'; θ⁻)          (double Q: Q(s', argmax_a' Q(s', a'; θ); θ⁻))

DDPG (Lillicrap et al., 2016) learns a deterministic actor μ(s; φ) and a critic Q(s, a; θ):

    critic  y = r + γⁿ (1 − done) Q(s', μ(s'; φ⁻); θ⁻),    actor  max_φ E[ Q(s, μ(s; φ); θ) ]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from raycraft.registry import field_doc, register_model

Activation = Literal["relu", "tanh"]
ACTIVATIONS: dict[Activation, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}


@dataclass
class QMLPConfig:
    hiddens: tuple[int, ...] = field_doc((256,), "Widths of the hidden layers of the shared torso.")
    activation: Activation = field_doc("tanh", "Hidden activation.")
    dueling: bool = field_doc(True, "Split the head into V(s) + A(s,a) − mean_a A(s,a) (Wang et al., 2016).")
    double_q: bool = field_doc(True, "Double DQN: the online net picks argmax_a' Q(s',a'), the target net scores it.")
    head_hiddens: tuple[int, ...] = field_doc((256,), "Hidden widths of each head (Q, or value and advantage).")


@dataclass
class NatureCNNConfig:
    dueling: bool = field_doc(True, "Split the head into V(s) + A(s,a) − mean_a A(s,a).")
    double_q: bool = field_doc(True, "Double DQN target (online argmax, target value).")
    hidden: int = field_doc(512, "Width of the fully connected layer after the three convolutions.")


@dataclass
class DDPGMLPConfig:
    actor_hiddens: tuple[int, ...] = field_doc((256, 256), "Hidden widths of the actor μ(s).")
    critic_hiddens: tuple[int, ...] = field_doc((256, 256), "Hidden widths of the critic Q(s, a).")


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


def q_values(obs: torch.Tensor, torso: nn.Module, advantage: nn.Module, value: nn.Module | None) -> torch.Tensor:
    """Q(s, ·) (B, |A|) from the torso's features h = φ(s):

        plain    Q(s, a) = A(h)_a
        dueling  Q(s, a) = V(h) + A(h)_a − mean_a' A(h)_a'      (Wang et al., 2016)

    Taking the networks as arguments lets the target copies θ⁻ use the same equation."""
    h = torso(obs.float())
    a = advantage(h)
    if value is None:
        return a
    return value(h) + a - a.mean(dim=-1, keepdim=True)


class QNetwork(nn.Module):
    """Q(s, ·; θ) for a discrete action space: a torso (feature extractor of output width `width`) and a
    plain or dueling head (`q_values`), each head an MLP of `head_hiddens`."""

    def __init__(self, torso: nn.Module, width: int, n_actions: int, head_hiddens: tuple[int, ...],
                 activation: type[nn.Module], dueling: bool) -> None:
        super().__init__()
        self.torso = torso
        head = [width, *head_hiddens]
        self.advantage = mlp([*head, n_actions], activation)
        self.value = mlp([*head, 1], activation) if dueling else None

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return q_values(obs, self.torso, self.advantage, self.value)


class ChannelsFirst(nn.Module):
    """(B, H, W, C) frames, as gymnasium gives them, to (B, C, H, W) for Conv2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


class NatureCNN(nn.Sequential):
    """The torso of Mnih et al. (2015) for (84, 84, 4) frames: conv 8×8/4 (32) → 4×4/2 (64) → 3×3/1 (64),
    each with ReLU, then a fully connected layer of `hidden` units: 64·7·7 = 3136 inputs for 84×84."""

    def __init__(self, obs_shape: tuple[int, ...], hidden: int) -> None:
        h, w, c = obs_shape
        convs = nn.Sequential(nn.Conv2d(c, 32, 8, stride=4), nn.ReLU(), nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
                              nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(), nn.Flatten())
        with torch.no_grad():
            flat = convs(torch.zeros(1, c, h, w)).shape[-1]
        super().__init__(ChannelsFirst(), convs, nn.Linear(flat, hidden), nn.ReLU())


def critic_value(critic: nn.Module, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Q(s, a) = critic([s, a]) (B,), for the critic or its target copy."""
    return critic(torch.cat([obs.flatten(1).float(), actions.flatten(1).float()], dim=-1)).squeeze(-1)


class ActorCritic(nn.Module):
    """DDPG's two networks, each an MLP with ReLU hidden layers:

        actor   μ(s; φ) = tanh(MLP(s)) ∈ [−1, 1]ᵈ     (the normalised action box)
        critic  Q(s, a; θ) = MLP([s, a])             (`critic_value`)
    """

    def __init__(self, obs_dim: int, act_dim: int, actor_hiddens: tuple[int, ...],
                 critic_hiddens: tuple[int, ...]) -> None:
        super().__init__()
        self.actor = mlp([obs_dim, *actor_hiddens, act_dim], nn.ReLU, nn.Tanh())
        self.critic = mlp([obs_dim + act_dim, *critic_hiddens, 1], nn.ReLU)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """μ(s): the greedy action."""
        return self.actor(obs.flatten(1).float())


def _flat(space) -> int:
    return int(np.prod(space.shape))


@register_model("q_mlp", family="rl", task="rl", config=QMLPConfig, recipe={"algo": "dqn"})
def q_mlp(cfg: QMLPConfig, info: dict) -> QNetwork:
    """DQN Q-network: MLP torso, optional dueling head, for vector observations."""
    sizes, act = [_flat(info["observation_space"]), *cfg.hiddens], ACTIVATIONS[cfg.activation]
    torso = nn.Sequential(nn.Flatten(), mlp(sizes, act, act()))
    return QNetwork(torso, sizes[-1], info["action_space"].n, tuple(cfg.head_hiddens), act, cfg.dueling)


@register_model("q_nature_cnn", family="rl", task="rl", config=NatureCNNConfig, recipe={"algo": "dqn"})
def q_nature_cnn(cfg: NatureCNNConfig, info: dict) -> QNetwork:
    """DQN Q-network of Mnih et al. (2015): 3 convolutions + 512 units, for 84×84×4 Atari frames."""
    torso = NatureCNN(info["observation_space"].shape, cfg.hidden)
    return QNetwork(torso, cfg.hidden, info["action_space"].n, (), nn.ReLU, cfg.dueling)


@register_model("ddpg_mlp", family="rl", task="rl", config=DDPGMLPConfig, recipe={"algo": "ddpg"})
def ddpg_mlp(cfg: DDPGMLPConfig, info: dict) -> ActorCritic:
    """DDPG actor μ(s) = tanh(MLP) and critic Q(s, a) = MLP([s, a]), each with a target copy."""
    return ActorCritic(_flat(info["observation_space"]), _flat(info["action_space"]), tuple(cfg.actor_hiddens),
                       tuple(cfg.critic_hiddens))
