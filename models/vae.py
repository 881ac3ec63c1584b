"""Variational autoencoder (Kingma & Welling 2014) with beta-VAE weighting (Higgins et al. 2017).

Encoder q_phi(z|x) = N(mu(x), diag sigma^2(x)), decoder p_theta(x|z) = Bernoulli(sigmoid(logits(z))) per
pixel, prior p(z) = N(0, I). Reparameterisation: z = mu + sigma * eps, eps ~ N(0, I). The evidence lower
bound per image

    ELBO(x) = E_q[log p_theta(x|z)] - KL(q_phi(z|x) || N(0, I)),
    KL      = 1/2 sum_j (mu_j^2 + sigma_j^2 - 1 - log sigma_j^2)          (closed form)

is estimated with one eps; training minimises  -E_q[log p(x|z)] + beta_t KL,  where beta_t rises
linearly from 0 to `beta` over `kl_warmup_epochs` (KL annealing, Bowman et al. 2016). A latent unit j is
active when Var_x(E_q[z_j|x]) > 0.01 (Burda et al. 2016): few active units reveal posterior collapse.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from raycraft.errors import UserError
from raycraft.models.gan import ConvDecoder, ConvEncoder, check_quarterable
from raycraft.models.generative import GenerativeConfig, GenerativeModel
from raycraft.models.layers import image_shape
from raycraft.registry import field_doc, register_model

ACTIVE_THRESHOLD = 0.01


@dataclass
class VAEConfig(GenerativeConfig):
    latent_dim: int = field_doc(16, "Dimension of z.")
    width: int = field_doc(32, "Base channel count w of the convolutional encoder and decoder.")
    beta: float = field_doc(1.0, "Weight of the KL term (beta-VAE; 1 is the ELBO).")
    kl_warmup_epochs: int = field_doc(0, "Epochs over which the KL weight rises linearly from 0 to beta.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.latent_dim < 1 or self.beta < 0 or self.kl_warmup_epochs < 0:
            raise UserError(f"vae: latent_dim ({self.latent_dim}) must be >= 1, beta ({self.beta}) and "
                            f"kl_warmup_epochs ({self.kl_warmup_epochs}) >= 0.")


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)) per example: 1/2 sum (mu^2 + sigma^2 - 1 - log sigma^2)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(dim=1)


def active_units(variances: Iterable[float]) -> float:
    """How many units j have Var_x(E_q[z_j|x]) > 0.01 (Burda et al. 2016), given those variances."""
    return float(sum(v > ACTIVE_THRESHOLD for v in variances))


class VAE(GenerativeModel):
    parts = ("encoder", "decoder")

    def __init__(self, cfg: VAEConfig, shape: tuple[int, int, int]) -> None:
        super().__init__(cfg, shape)
        self.encoder = ConvEncoder(shape, cfg.width, 2 * cfg.latent_dim)  # -> (mu, log sigma^2)
        self.decoder = ConvDecoder(cfg.latent_dim, cfg.width, shape, batch_norm=False)  # -> Bernoulli logits
        self.kl_weight = cfg.beta

    def start_epoch(self, epoch: int) -> None:
        """KL annealing: beta_t = beta min(1, epoch / kl_warmup_epochs)."""
        warm = self.cfg.kl_warmup_epochs
        self.kl_weight = self.cfg.beta * (min(1.0, epoch / warm) if warm else 1.0)

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, self.cfg.latent_dim, generator=generator, device=self.decoder.project.weight.device)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (N, d) -> (N, C, H, W): the decoder's mean
        return torch.sigmoid(self.decoder(z))

    def terms(self, net: nn.Module, x: torch.Tensor, eps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-example reconstruction -log p(x|z), KL and ELBO = log p(x|z) - KL, with one z = mu + sigma * eps;
        also the posterior means mu (for active units)."""
        mu, logvar = net.encoder(x).chunk(2, dim=1)
        eps = torch.randn_like(mu) if eps is None else eps
        z = mu + torch.exp(0.5 * logvar) * eps
        recon = F.binary_cross_entropy_with_logits(net.decoder(z), x, reduction="none").flatten(1).sum(1)
        kl = gaussian_kl(mu, logvar)
        return {"recon": recon, "kl": kl, "elbo": -recon - kl, "mu": mu}

    def loss(self, t: dict[str, torch.Tensor], kl_weight: float) -> torch.Tensor:
        """The per-example loss minimised: -log p(x|z) + beta_t KL (the negative ELBO at beta_t = 1)."""
        return t["recon"] + kl_weight * t["kl"]

    def epoch_images(self, real: torch.Tensor | None, generator: torch.Generator) -> dict[str, torch.Tensor]:
        images = {"samples": self.sample(self.cfg.grid_samples, generator)}
        if real is None:
            return images
        mu = self.encoder(real).chunk(2, dim=1)[0]
        images["reconstructions"] = torch.cat([real, self(mu)])  # top half originals, bottom half reconstructions
        if self.cfg.latent_dim >= 2:  # the two units whose posterior means vary most across images
            dims = mu.var(dim=0).topk(2).indices
            steps = torch.linspace(-2.5, 2.5, 8, device=real.device)
            z = torch.zeros(64, self.cfg.latent_dim, device=real.device)
            z[:, dims[0]] = steps.repeat_interleave(8)
            z[:, dims[1]] = steps.repeat(8)
            images["latent_traversal"] = self(z)
        return images


@register_model("vae", family="generative", config=VAEConfig, task="generative",
                recipe={"epochs": 30, "batch_size": 64, "optim": {"name": "adam", "lr": 1e-3}})
def vae(cfg: VAEConfig, data_info: dict) -> VAE:
    """VAE: convolutional Gaussian encoder, Bernoulli decoder, ELBO with beta and KL annealing."""
    shape = image_shape(data_info)
    check_quarterable(shape, "vae")
    return VAE(cfg, shape)
