"""Generative adversarial networks (Goodfellow et al. 2014) and Wasserstein GANs (Arjovsky et al. 2017).

GAN: a generator G and a discriminator D (logit l = D(x), probability sigmoid(l)) play

    min_G max_D  E_x[log D(x)] + E_z[log(1 - D(G(z)))],     z ~ N(0, I)

    discriminator loss   L_D = -log D(x) - log(1 - D(G(z)))           (binary cross-entropy)
    generator, minimax   L_G = log(1 - D(G(z)))
    generator, non-saturating (the paper's practical choice)   L_G = -log D(G(z))

WGAN: a critic f (no sigmoid) estimates the Wasserstein-1 distance W = E_x[f(x)] - E_z[f(G(z))];

    critic loss  L_f = E_z[f(G(z))] - E_x[f(x)]   (+ lambda E[(||grad f(x_hat)||_2 - 1)^2] with a gradient penalty,
                                                     x_hat = u x + (1 - u) G(z), u ~ U(0, 1): Gulrajani et al. 2017)
    generator    L_G = -E_z[f(G(z))]

with `n_critic` critic steps per generator step, and after each critic step every critic weight clipped
to [-c, c] (the Lipschitz constraint of the paper); that alternation is the training procedure's
(`raycraft.generative.objectives`), the losses are here. The nets are DCGAN-style (Radford et al. 2016):
for an H x H image (H divisible by 4: 8, 28, 32) the generator maps z to 4w maps of H/4 x H/4 and
doubles twice with transposed convolutions; the discriminator mirrors it with strided convolutions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from raycraft.errors import UserError
from raycraft.models.generative import GenerativeConfig, GenerativeModel
from raycraft.models.layers import image_shape
from raycraft.registry import field_doc, register_model


def check_quarterable(shape: tuple[int, int, int], model: str) -> None:
    if shape[1] % 4 or shape[2] % 4:
        raise UserError(f"dataset: {model} halves images twice, so height and width must be divisible by 4; "
                        f"got {shape[1]}x{shape[2]}. Image datasets that fit: digits (8), mnist5k (28), cifar10 (32).")


class ConvDecoder(nn.Module):
    """z (N, d) -> Linear -> (N, 4w, H/4, W/4) -> ConvT -> (N, 2w, H/2, W/2) -> ConvT -> (N, C, H, W) (no output
    activation)."""

    def __init__(self, latent_dim: int, width: int, shape: tuple[int, int, int], batch_norm: bool) -> None:
        super().__init__()
        c, h, w = shape
        norm = nn.BatchNorm2d if batch_norm else (lambda ch: nn.Identity())
        self.start = (4 * width, h // 4, w // 4)
        self.project = nn.Linear(latent_dim, 4 * width * (h // 4) * (w // 4))
        self.net = nn.Sequential(
            norm(4 * width), nn.ReLU(),
            nn.ConvTranspose2d(4 * width, 2 * width, 4, 2, 1), norm(2 * width), nn.ReLU(),
            nn.ConvTranspose2d(2 * width, c, 4, 2, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.project(z).view(-1, *self.start))


class ConvEncoder(nn.Module):
    """(N, C, H, W) -> two stride-2 convolutions with leaky ReLU -> Linear -> (N, out_dim)."""

    def __init__(self, shape: tuple[int, int, int], width: int, out_dim: int) -> None:
        super().__init__()
        c, h, w = shape
        self.net = nn.Sequential(
            nn.Conv2d(c, 2 * width, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 4 * width, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Flatten(), nn.Linear(4 * width * (h // 4) * (w // 4), out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass
class GANConfig(GenerativeConfig):
    latent_dim: int = field_doc(64, "Dimension of z ~ N(0, I). 1 makes a deliberately collapse-prone generator.")
    width: int = field_doc(32, "Base channel count w (the nets use 2w and 4w).")
    generator_loss: Literal["non_saturating", "minimax"] = field_doc(
        "non_saturating", "-log D(G(z)) (strong early gradients) or the minimax log(1 - D(G(z))).")


@dataclass
class WGANConfig(GenerativeConfig):
    latent_dim: int = field_doc(64, "Dimension of z ~ N(0, I).")
    width: int = field_doc(32, "Base channel count w (the nets use 2w and 4w).")
    n_critic: int = field_doc(5, "Critic steps per generator step; each takes 1/n_critic of the batch.")
    clip: float | None = field_doc(0.01, "Clip every critic weight to [-clip, clip] after each critic step "
                                         "(null: no clipping, e.g. with a gradient penalty).")
    gradient_penalty: float = field_doc(0.0, "lambda of the WGAN-GP penalty (0: off; the paper uses 10).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_critic < 1:
            raise UserError(f"wgan.n_critic: {self.n_critic} must be at least 1.")
        if self.clip is not None and self.clip <= 0:
            raise UserError(f"wgan.clip: {self.clip} must be > 0 (or null for no clipping).")


def discriminator_loss(real_logit: torch.Tensor, fake_logit: torch.Tensor) -> torch.Tensor:
    """L_D = -log sigmoid(l_real) - log(1 - sigmoid(l_fake)), averaged over the batch."""
    return (F.binary_cross_entropy_with_logits(real_logit, torch.ones_like(real_logit))
            + F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit)))


def generator_loss(fake_logit: torch.Tensor, kind: str) -> torch.Tensor:
    """minimax: log(1 - sigmoid(l)) = -softplus(l);  non_saturating: -log sigmoid(l) = softplus(-l)."""
    if kind == "minimax":
        return -F.softplus(fake_logit).mean()
    return F.softplus(-fake_logit).mean()


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """E[(||grad_x f(x_hat)||_2 - 1)^2] on random interpolates x_hat = u x + (1 - u) G(z)."""
    u = torch.rand(len(real), 1, 1, 1, device=real.device)
    x_hat = (u * real + (1 - u) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


class GAN(GenerativeModel):
    """Generator and discriminator; images live in [-1, 1] inside, [0, 1] outside."""

    parts = ("generator", "discriminator")

    def __init__(self, cfg: GANConfig | WGANConfig, shape: tuple[int, int, int]) -> None:
        super().__init__(cfg, shape)
        self.generator = ConvDecoder(cfg.latent_dim, cfg.width, shape, batch_norm=True)
        self.discriminator = ConvEncoder(shape, cfg.width, 1)

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        device = self.generator.project.weight.device
        return torch.randn(n, self.cfg.latent_dim, generator=generator, device=device)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (N, d) -> (N, C, H, W) in [0, 1]
        return (torch.tanh(self.generator(z)) + 1) / 2

    def logits(self, net: nn.Module, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """D's logits on a real batch and as many fresh fakes G(z) (no gradient to G), and the fakes."""
        with torch.no_grad():
            fake = torch.tanh(net.generator(self.noise(len(real))))
        logits = net.discriminator(torch.cat([real, fake])).squeeze(1)  # one call: one DDP forward
        return logits[:len(real)], logits[len(real):], fake

    def fake_logit(self, net: nn.Module, n: int) -> torch.Tensor:
        """D(G(z)) on n fresh z, with gradients to G."""
        return net.discriminator(torch.tanh(net.generator(self.noise(n)))).squeeze(1)

    def d_losses(self, net: nn.Module, real: torch.Tensor) -> dict[str, torch.Tensor]:
        """L_D = -log D(x) - log(1 - D(G(z))) on a real batch in [-1, 1] and as many fakes."""
        real_logit, fake_logit, _ = self.logits(net, real)
        return {"d_loss": discriminator_loss(real_logit, fake_logit)}

    def g_loss(self, net: nn.Module, n: int) -> torch.Tensor:
        """L_G on n fresh fakes: -log D(G(z)) (non-saturating) or log(1 - D(G(z))) (minimax)."""
        return generator_loss(self.fake_logit(net, n), self.cfg.generator_loss)


class WGAN(GAN):
    """Generator and critic f: the discriminator's output is an unbounded score, not a logit."""

    def d_losses(self, net: nn.Module, real: torch.Tensor) -> dict[str, torch.Tensor]:
        """L_f = E[f(G(z))] - E[f(x)] = -W, plus lambda times the gradient penalty while gradients are on
        (it is a training term; evaluation, under no_grad, reports -W); W itself as `wasserstein`."""
        real_logit, fake_logit, fake = self.logits(net, real)
        w = real_logit.mean() - fake_logit.mean()
        loss = -w
        if self.cfg.gradient_penalty and torch.is_grad_enabled():
            loss = loss + self.cfg.gradient_penalty * gradient_penalty(net.discriminator, real, fake)
        return {"d_loss": loss, "wasserstein": w}

    def g_loss(self, net: nn.Module, n: int) -> torch.Tensor:
        """L_G = -E_z[f(G(z))]."""
        return -self.fake_logit(net, n).mean()


@register_model("gan", family="generative", config=GANConfig, task="generative",
                recipe={"epochs": 30, "batch_size": 64,
                        "optim": {"name": "adam", "lr": 2e-4, "betas": [0.5, 0.999], "schedule": "constant"}})
def gan(cfg: GANConfig, data_info: dict) -> GAN:
    """GAN: DCGAN generator and discriminator on the minimax (or non-saturating) objective."""
    shape = image_shape(data_info)
    check_quarterable(shape, "gan")
    return GAN(cfg, shape)


@register_model("wgan", family="generative", config=WGANConfig, task="generative",
                recipe={"epochs": 30, "batch_size": 320,
                        "optim": {"name": "rmsprop", "lr": 5e-5, "schedule": "constant"}})
def wgan(cfg: WGANConfig, data_info: dict) -> WGAN:
    """WGAN: DCGAN generator and a weight-clipped critic (gradient penalty optional), n_critic steps per G step."""
    shape = image_shape(data_info)
    check_quarterable(shape, "wgan")
    return WGAN(cfg, shape)
