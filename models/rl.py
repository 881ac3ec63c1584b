"""RL policies and value networks, registered by name (family `rl`, task `rl`) for `raycraft rl --model`.

Each builder returns an RLlib RLModule (a torch `nn.Module`) built for `info["observation_space"]` and
`info["action_space"]`; the classes live in `raycraft.rl.modules` (RLlib is imported only when one is built).
"""

from __future__ import annotations

from dataclasses import dataclass

from raycraft.registry import field_doc, register_model


@dataclass
class QMLPConfig:
    hiddens: tuple[int, ...] = field_doc((256,), "Widths of the hidden layers of the shared torso.")
    activation: str = field_doc("tanh", "Hidden activation: relu or tanh.")
    dueling: bool = field_doc(True, "Split the head into V(s) + A(s,a) − mean_a A(s,a) (Wang et al., 2016).")
    double_q: bool = field_doc(True, "Double DQN: the online net picks argmax_a' Q(s',a'), the target net scores it.")
    head_hiddens: tuple[int, ...] = field_doc((256,), "Hidden widths of each head (Q, or value and advantage).")

    def __post_init__(self) -> None:
        from raycraft.errors import invalid_choice

        if self.activation not in ("relu", "tanh"):
            raise invalid_choice("model_args.activation", self.activation, ("relu", "tanh"))


@dataclass
class NatureCNNConfig:
    dueling: bool = field_doc(True, "Split the head into V(s) + A(s,a) − mean_a A(s,a).")
    double_q: bool = field_doc(True, "Double DQN target (online argmax, target value).")
    hidden: int = field_doc(512, "Width of the fully connected layer after the three convolutions.")


@dataclass
class DDPGMLPConfig:
    actor_hiddens: tuple[int, ...] = field_doc((256, 256), "Hidden widths of the actor μ(s).")
    critic_hiddens: tuple[int, ...] = field_doc((256, 256), "Hidden widths of the critic Q(s, a).")


def _build(cls_name: str, cfg, info: dict):
    from raycraft.rl import modules

    return modules.build(getattr(modules, cls_name), cfg, info)


@register_model("q_mlp", family="rl", task="rl", config=QMLPConfig, recipe={"algo": "dqn"})
def q_mlp(cfg: QMLPConfig, info: dict):
    """DQN Q-network: MLP torso, optional dueling head, for vector observations."""
    return _build("QMLPModule", cfg, info)


@register_model("q_nature_cnn", family="rl", task="rl", config=NatureCNNConfig, recipe={"algo": "dqn"})
def q_nature_cnn(cfg: NatureCNNConfig, info: dict):
    """DQN Q-network of Mnih et al. (2015): 3 convolutions + 512 units, for 84×84×4 Atari frames."""
    return _build("NatureCNNQModule", cfg, info)


@register_model("ddpg_mlp", family="rl", task="rl", config=DDPGMLPConfig, recipe={"algo": "ddpg"})
def ddpg_mlp(cfg: DDPGMLPConfig, info: dict):
    """DDPG actor μ(s) = tanh(MLP) and critic Q(s, a) = MLP([s, a]), each with a target copy."""
    return _build("DDPGModule", cfg, info)
