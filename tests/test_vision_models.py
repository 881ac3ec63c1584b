"""Vision models: each equation pinned to a reference, and a few real training steps on real data."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from raycraft.data.base import DataConfig
from raycraft.models.efficientnet import ALPHA, BETA, GAMMA, EfficientNet, EfficientNetConfig
from raycraft.models.inception import InceptionModule
from raycraft.models.layers import DynamicTanh
from raycraft.models.mlp import MLP, MLPConfig
from raycraft.models.resnet import BasicBlock
from raycraft.registry import create_model, load_dataset, models

VISION = ["mlp", "lenet5", "alexnet", "vgg11", "vgg16", "inception", "resnet18", "resnet34", "efficientnet_b0"]


@pytest.fixture(scope="module")
def real_batches():
    """32 real examples from each shipped image dataset."""
    out = {}
    for name in ("digits", "mnist5k"):
        splits = load_dataset(name, DataConfig())
        x, y = splits.train[:32]
        out[name] = (x, y, splits.info)
    return out


def test_every_item8_model_is_registered():
    assert set(VISION) <= set(models())


@pytest.mark.parametrize("name", VISION)
@pytest.mark.parametrize("dataset", ["digits", "mnist5k"])
def test_few_training_steps_reduce_loss(name, dataset, real_batches):
    x, y, info = real_batches[dataset]
    torch.manual_seed(0)
    model = create_model(name, None, info)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for _ in range(4):  # same batch, same dropout mask: the loss must fall if gradients flow end to end
        torch.manual_seed(1)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    assert model.eval()(x[:3]).shape == (3, 10)


def test_dynamic_tanh_formula():
    dyt = DynamicTanh(4, alpha_init=0.7)
    with torch.no_grad():
        dyt.gamma.copy_(torch.tensor([1.0, 2.0, -1.0, 0.5]))
        dyt.beta.copy_(torch.tensor([0.0, 0.1, 0.2, 0.3]))
    x = torch.randn(5, 4)
    expected = dyt.gamma * torch.tanh(0.7 * x) + dyt.beta  # gamma * tanh(alpha x) + beta
    torch.testing.assert_close(dyt(x), expected)
    maps = DynamicTanh(3, channel_dim=1)
    assert maps(torch.randn(2, 3, 4, 4)).shape == (2, 3, 4, 4)


def test_mlp_he_init_variance():
    torch.manual_seed(0)
    model = MLP(MLPConfig(hidden=(2048,), norm="none", dropout=0.0), in_features=1024, n_out=10)
    w = model.net[1].weight  # first Linear after Flatten
    assert w.var().item() == pytest.approx(2.0 / 1024, rel=0.05)  # Var W = 2 / fan_in


def test_mlp_norm_options_build_the_right_layers():
    assert any(isinstance(m, nn.BatchNorm1d) for m in MLP(MLPConfig(norm="batch"), 64, 10).modules())
    assert any(isinstance(m, DynamicTanh) for m in MLP(MLPConfig(norm="dyt"), 64, 10).modules())


def test_residual_block_is_identity_plus_residual():
    torch.manual_seed(0)
    block = BasicBlock(8, 8, stride=1).eval()
    x = torch.randn(2, 8, 6, 6)
    expected = torch.relu(block.residual(x) + x)  # y = relu(F(x) + x)
    torch.testing.assert_close(block(x), expected)
    nn.init.zeros_(block.residual[-1].weight)  # F = 0: the block passes relu(x)
    torch.testing.assert_close(block(x), torch.relu(x))
    down = BasicBlock(8, 16, stride=2).eval()
    assert down(x).shape == (2, 16, 3, 3)  # projection shortcut W_s matches the new shape


def test_inception_module_concatenates_four_branches():
    module = InceptionModule(16, c1=4, r3=6, c3=8, r5=2, c5=3, pool_proj=5).eval()
    x = torch.randn(2, 16, 8, 8)
    y = module(x)
    assert y.shape == (2, 4 + 8 + 3 + 5, 8, 8)
    torch.testing.assert_close(y[:, :4], module.branch1(x))
    torch.testing.assert_close(y[:, 4:12], module.branch3(x))


def test_efficientnet_compound_scaling():
    assert ALPHA * BETA**2 * GAMMA**2 == pytest.approx(2.0, abs=0.1)  # FLOPs x ~2 per unit of phi
    base = EfficientNet(EfficientNetConfig(phi=0), 1, 10)
    big = EfficientNet(EfficientNetConfig(phi=2), 1, 10)
    assert base.resolution == 32 and big.resolution == round(32 * GAMMA**2)
    n_blocks = [sum(1 for m in net.modules() if type(m).__name__ == "MBConv") for net in (base, big)]
    assert n_blocks[0] == 16  # B0: 1 + 2 + 2 + 3 + 3 + 4 + 1
    assert n_blocks[1] > n_blocks[0]
    params = [sum(p.numel() for p in net.parameters()) for net in (base, big)]
    assert params[1] > params[0]


def test_lenet_feature_map_sizes():
    model = create_model("lenet5", None, {"input_shape": (1, 28, 28), "num_classes": 10}).eval()
    x = model.resize(torch.randn(1, 1, 28, 28))
    assert x.shape[-1] == 32
    shapes = []
    for layer in model.features:
        x = layer(x)
        if isinstance(layer, nn.Conv2d):
            shapes.append(tuple(x.shape[1:]))
    assert shapes == [(6, 28, 28), (16, 10, 10), (120, 1, 1)]  # C1, C3, C5
