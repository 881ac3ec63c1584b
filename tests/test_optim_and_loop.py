"""The shared loop's parts: lr schedule, L1 penalty, clipping, sharded batches and metric reduction."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from raycraft.classification.step import ClassificationStep
from raycraft.train.config import OptimConfig, TrainConfig
from raycraft.train.loop import Batches, Sums, Updater
from raycraft.train.optim import l1_penalty, lr_factor


def test_warmup_then_cosine():
    total, warm = 100, 10
    f = [lr_factor(s, total, warm, "cosine", 0.1) for s in range(total + 1)]
    assert f[0] == pytest.approx(1 / warm) and f[warm - 1] == pytest.approx(1.0)  # linear warm-up
    mid = warm + (total - warm) // 2
    assert f[mid] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # half-way: (1+m)/2
    assert f[total] == pytest.approx(0.1)  # ends at min_lr_ratio
    assert all(a >= b for a, b in zip(f[warm:], f[warm + 1:], strict=False))  # monotone decay after warm-up
    assert lr_factor(50, total, warm, "constant", 0.0) == 1.0


def _tiny(cfg: TrainConfig):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    return model, Updater(ClassificationStep(), model, cfg, steps_per_epoch=10, device=torch.device("cpu"))


def test_l1_penalty_adds_lambda_sign_to_gradient():
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    grads = {}
    for l1 in (0.0, 0.5):
        cfg = TrainConfig(model="mlp", optim=OptimConfig(name="sgd", lr=1.0, momentum=0.0, l1=l1, schedule="constant"))
        model, update = _tiny(cfg)
        w0 = model.weight.detach().clone()
        update("main", nn.functional.cross_entropy(model(x), y))
        grads[l1] = w0 - model.weight.detach()  # lr = 1: the step equals the gradient
    # d/dW [lambda * sum|W|] = lambda * sign(W); biases (ndim < 2) carry no penalty
    torch.testing.assert_close(grads[0.5] - grads[0.0], 0.5 * torch.sign(w0))
    assert l1_penalty([nn.Parameter(torch.tensor([[1.0, -2.0]])), nn.Parameter(torch.tensor([5.0]))]).item() == 3.0


def test_gradient_clipping_bounds_the_step():
    x, y = 100 * torch.randn(8, 3), torch.randint(0, 2, (8,))
    cfg = TrainConfig(model="mlp", optim=OptimConfig(name="sgd", lr=1.0, momentum=0.0, grad_clip=0.01,
                                                     schedule="constant"))
    model, update = _tiny(cfg)
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    update("main", nn.functional.cross_entropy(model(x), y))
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert (before - after).norm().item() == pytest.approx(0.01, rel=1e-4)  # lr * clipped norm


def test_train_shards_cover_all_examples_equally():
    data = TensorDataset(torch.arange(10).float(), torch.arange(10))
    shards = [Batches(data, 3, rank, 3, shuffle=True, seed=1) for rank in range(3)]
    idx = [s.indices() for s in shards]
    assert len({len(i) for i in idx}) == 1  # equal step counts keep DDP in lockstep
    assert set(torch.cat(idx).tolist()) == set(range(10))
    shards[0].epoch = 1
    assert not torch.equal(shards[0].indices(), idx[0])  # reshuffled each epoch


def test_eval_shards_are_disjoint_and_unpadded():
    data = TensorDataset(torch.arange(10).float(), torch.arange(10))
    idx = [Batches(data, 4, rank, 3, shuffle=False).indices() for rank in range(3)]
    assert sorted(torch.cat(idx).tolist()) == list(range(10))


def test_sums_turn_into_per_example_means():
    sums = Sums()
    sums.add({"loss": torch.tensor(6.0), "accuracy": torch.tensor(2), "n": torch.tensor(3)})
    sums.add({"loss": torch.tensor(4.0), "accuracy": torch.tensor(1), "n": torch.tensor(2)})
    assert sums.means() == {"loss": pytest.approx(2.0), "accuracy": pytest.approx(0.6)}


def test_resume_keeps_moments_and_step_but_takes_new_hyperparameters():
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    cfg = TrainConfig(model="mlp", optim=OptimConfig(name="adamw", lr=0.1, schedule="constant", warmup_epochs=1))
    model, update = _tiny(cfg)
    for _ in range(3):
        update("main", nn.functional.cross_entropy(model(x), y))
    state = update.state_dict()
    new = TrainConfig(model="mlp", optim=OptimConfig(name="adamw", lr=0.01, weight_decay=0.5,
                                                     schedule="constant", warmup_epochs=1))
    _, resumed = _tiny(new)
    resumed.load_state_dict(state)
    group = resumed.optimizers["main"].param_groups[0]
    assert group["weight_decay"] == 0.5
    assert group["lr"] == pytest.approx(0.01 * 4 / 10)  # warm-up step 3 of 10 at the new peak lr
    saved = state["optimizers"]["main"]["state"][0]["exp_avg"]
    torch.testing.assert_close(resumed.optimizers["main"].state_dict()["state"][0]["exp_avg"], saved)
    _, switched = _tiny(TrainConfig(model="mlp", optim=OptimConfig(name="sgd", lr=0.01)))
    switched.load_state_dict(state)  # another optimizer: fresh moments, no KeyError
    assert switched.optimizers["main"].state_dict()["state"] == {}


def test_mixed_precision_is_bf16_autocast_on_cpu():
    from raycraft.train.loop import autocast_for

    layer = nn.Linear(4, 4)
    with autocast_for("mixed", torch.device("cpu"))():
        assert layer(torch.randn(2, 4)).dtype == torch.bfloat16
    with autocast_for("fp32", torch.device("cpu"))():
        assert layer(torch.randn(2, 4)).dtype == torch.float32


def test_mixed_precision_trains_like_fp32_when_autocast_spans_the_epoch():
    """The loop enters autocast once an epoch; each forward must still see the weights of the last update
    (autocast caches its bf16 copies of the weights until its context exits)."""
    from raycraft.train.loop import autocast_for

    x, y = torch.randn(64, 8, generator=torch.Generator().manual_seed(1)), torch.arange(64) % 2
    curves = {}
    for precision in ("fp32", "mixed"):
        cfg = TrainConfig(model="mlp", precision=precision,
                          optim=OptimConfig(name="sgd", lr=0.5, momentum=0.0, schedule="constant"))
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
        update = Updater(ClassificationStep(), model, cfg, steps_per_epoch=30, device=torch.device("cpu"))
        losses = []
        with autocast_for(precision, torch.device("cpu"))():
            for _ in range(30):
                loss = nn.functional.cross_entropy(model(x).float(), y)
                update("main", loss)
                losses.append(loss.item())
        curves[precision] = losses
    assert curves["fp32"][-1] < 0.8 * curves["fp32"][0]
    assert curves["mixed"] == pytest.approx(curves["fp32"], rel=0.03)
