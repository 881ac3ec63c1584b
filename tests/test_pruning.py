"""Lottery tickets: the IMP schedule, global magnitude pruning, rewinding, the re-init control, and masks
that stay applied through optimizer steps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from raycraft.classification.step import ClassificationStep
from raycraft.errors import UserError
from raycraft.train.config import OptimConfig, PruneConfig, TrainConfig
from raycraft.train.loop import Updater
from raycraft.train.pruning import Ticket, clone_state, find_ticket, prunable, round_sparsities


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def test_rounds_follow_the_rate_and_end_exactly_at_the_target():
    assert round_sparsities(0.0, 0.2) == []
    s = round_sparsities(0.9, 0.2)
    # 1 - 0.8^r: 0.2, 0.36, 0.488, ... until 0.9 is passed (r = 11 gives 0.914), which is clipped to 0.9
    assert len(s) == 11 and s[-1] == 0.9
    assert s[:3] == pytest.approx([0.2, 0.36, 0.488])
    assert round_sparsities(0.5, 0.5) == [0.5]


def test_prunable_weights_are_linear_and_conv_weights_only():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3))
    assert list(prunable(net)) == ["0.weight", "3.weight"]


def test_prune_keeps_the_largest_magnitudes_across_layers():
    net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[0.1, -5.0], [0.3, 2.0]]))
        net[1].weight.copy_(torch.tensor([[-0.2, 4.0]]))
    ticket = Ticket(net)
    ticket.prune_to(0.5)  # 6 weights, keep the 3 largest |w| wherever they are: -5, 4, 2
    assert ticket.masks["0.weight"].tolist() == [[False, True], [False, True]]
    assert ticket.masks["1.weight"].tolist() == [[False, True]]
    assert ticket.sparsity() == 0.5
    ticket.apply()
    assert net[0].weight.tolist() == [[0.0, -5.0], [0.0, 2.0]]
    with torch.no_grad():  # a later round ranks only the survivors, even if a pruned weight grew back
        net[0].weight[0, 0] = 100.0
    ticket.prune_to(2 / 3)
    assert int(sum(m.sum() for m in ticket.masks.values())) == 2 and not ticket.masks["0.weight"][0, 0]


@pytest.mark.parametrize("rewind_epoch", [0, 1])
def test_imp_rewinds_survivors_to_their_early_values(rewind_epoch):
    net = _net()
    theta = [clone_state(net)]  # theta[k]: weights after k epochs of the first (dense) round

    def train_round(ticket, after_epoch):
        for epoch in range(3):
            with torch.no_grad():
                for w in net.parameters():
                    w.add_(torch.randn_like(w))
            ticket.apply()
            if len(theta) < 4:
                theta.append(clone_state(net))
            after_epoch(epoch)
        return {"accuracy": 0.5}

    ticket, rounds = find_ticket(net, PruneConfig(sparsity=0.75, rate=0.5, rewind_epoch=rewind_epoch),
                                 train_round, fresh_state=lambda: clone_state(_net(seed=1)))
    assert [s for s, _ in rounds] == [0.0, 0.5]  # two rounds: 50%, then 75%
    assert ticket.sparsity() == 0.75
    for name, w in prunable(net).items():
        torch.testing.assert_close(w, theta[rewind_epoch][name] * ticket.masks[name])
    torch.testing.assert_close(net[0].bias, theta[rewind_epoch]["0.bias"])  # biases are never pruned


def test_the_control_trains_the_same_mask_from_a_fresh_initialisation():
    net, other = _net(), _net(seed=1)

    def train_round(ticket, after_epoch):
        with torch.no_grad():
            for w in net.parameters():
                w.mul_(3.0)
        after_epoch(0)
        return {}

    ticket, _ = find_ticket(net, PruneConfig(sparsity=0.5, rate=0.5, reinit=True), train_round,
                            fresh_state=lambda: clone_state(other))
    for name, w in prunable(net).items():
        torch.testing.assert_close(w, prunable(other)[name] * ticket.masks[name])


def test_pruned_weights_stay_zero_through_adam_and_weight_decay():
    net = _net()
    ticket = Ticket(net)
    ticket.prune_to(0.6)
    ticket.apply()
    cfg = TrainConfig(model="mlp", optim=OptimConfig(name="adamw", lr=0.1, weight_decay=0.1, schedule="constant"))
    update = Updater(ClassificationStep(), net, cfg, steps_per_epoch=5, device=torch.device("cpu"), ticket=ticket)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(5):
        update("main", nn.functional.cross_entropy(net(x), y))
    for name, w in prunable(net).items():
        assert (w[~ticket.masks[name]] == 0).all()
        assert (w[ticket.masks[name]] != 0).all()  # the survivors did train


def test_masks_that_do_not_fit_the_model_are_refused():
    with pytest.raises(ValueError, match="do not match"):
        Ticket(_net(), {"0.weight": torch.ones(8, 6, dtype=torch.bool)})


@pytest.mark.parametrize("override, message", [
    ({"sparsity": 1.0}, "prune.sparsity: 1.0 must be in"),
    ({"rate": 0.0}, "prune.rate: 0.0 must be in"),
    ({"rewind_epoch": -1}, "prune.rewind_epoch: -1"),
])
def test_bad_prune_settings_are_named(override, message):
    with pytest.raises(UserError, match=message):
        PruneConfig(**override)


def test_rewinding_past_the_training_is_refused():
    with pytest.raises(UserError, match=r"prune.rewind_epoch: 3 must be below epochs \(3\)"):
        TrainConfig(model="mlp", epochs=3, prune=PruneConfig(sparsity=0.5, rewind_epoch=3))
