"""How each kind of generative model is optimised: the procedure around the equations its model holds.

A model (raycraft.models) says what its losses are; an objective here says which optimizer steps on
which loss when, and which per-batch sums become metrics (see `raycraft.train.step`). `net` is the
module to call parts through (the model, or its data-parallel view); `model` is the model itself.

    GAN      one discriminator step on L_D, then one generator step on L_G
    WGAN     n_critic critic steps, each on 1/n_critic of the batch and followed by weight clipping,
             then one generator step
    VAE      one step on -log p(x|z) + beta_t KL; evaluation also counts active latent units
    DDPM     one step on L_simple
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from raycraft.models.ddpm import DDPM
from raycraft.models.gan import GAN, WGAN
from raycraft.models.generative import GenerativeModel
from raycraft.models.vae import VAE, active_units
from raycraft.train.step import Sums, Update


class Objective:
    players: tuple[str, ...] = ("main",)
    """Optimizer names; `parameters(model, name)` says which parameters each one steps."""

    def parameters(self, model: GenerativeModel, player: str) -> Iterable[nn.Parameter]:
        return model.parameters()

    def train_batch(self, model: GenerativeModel, net: nn.Module, x: torch.Tensor, update: Update) -> Sums:
        raise NotImplementedError

    def eval_batch(self, model: GenerativeModel, x: torch.Tensor) -> Sums:
        raise NotImplementedError

    def finalize(self, model: GenerativeModel, means: dict[str, float]) -> dict[str, float]:
        return means


class Adversarial(Objective):
    """The alternating updates of Goodfellow et al. 2014: discriminator first, on fresh fakes, then generator."""

    players = ("generator", "discriminator")

    def parameters(self, model: GAN, player: str) -> Iterable[nn.Parameter]:
        return getattr(model, player).parameters()

    def critic_batches(self, model: GAN, real: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The batches of the discriminator steps taken before each generator step."""
        return (real,)

    def after_critic_step(self, model: GAN) -> None:
        """Constraints on the discriminator's weights, applied after each of its optimizer steps."""

    def train_batch(self, model: GAN, net: nn.Module, x: torch.Tensor, update: Update) -> Sums:
        chunks = self.critic_batches(model, 2 * x - 1)
        sums: Sums = {}
        for chunk in chunks:
            d = model.d_losses(net, chunk)
            update("discriminator", d["d_loss"])
            self.after_critic_step(model)
            for k, v in d.items():
                sums[k] = sums.get(k, 0) + v.detach() * len(chunk)
        g = model.g_loss(net, len(chunks[-1]))
        update("generator", g)
        n = x.new_tensor(len(x))
        return {**sums, "g_loss": g.detach() * n, "loss": g.detach() * n, "n": n}

    def eval_batch(self, model: GAN, x: torch.Tensor) -> Sums:
        d = model.d_losses(model, 2 * x - 1)
        g = model.g_loss(model, len(x))
        n = x.new_tensor(len(x))
        return {**{k: v * n for k, v in d.items()}, "g_loss": g * n, "loss": g * n, "n": n}


class Wasserstein(Adversarial):
    """Arjovsky et al. 2017: n_critic critic steps per generator step, each followed by clipping every critic
    weight to [-clip, clip] (the Lipschitz constraint; off with clip null, e.g. under a gradient penalty)."""

    def critic_batches(self, model: WGAN, real: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return real.chunk(model.cfg.n_critic)

    def after_critic_step(self, model: WGAN) -> None:
        if model.cfg.clip is None:
            return
        with torch.no_grad():
            for p in model.discriminator.parameters():
                p.clamp_(-model.cfg.clip, model.cfg.clip)


ELBO_TERMS = ("recon", "kl", "elbo")


class Variational(Objective):
    """The ELBO with the KL weight of the current epoch (`VAE.start_epoch`); evaluation uses the full beta and
    sums the first two moments of every posterior mean, which `finalize` turns into the active-unit count."""

    def train_batch(self, model: VAE, net: nn.Module, x: torch.Tensor, update: Update) -> Sums:
        t = model.terms(net, x)
        loss = model.loss(t, model.kl_weight)
        update("main", loss.mean())
        return {"loss": loss.detach().sum(), **{k: t[k].detach().sum() for k in ELBO_TERMS},
                "kl_weight": x.new_tensor(model.kl_weight * len(x)), "n": x.new_tensor(len(x))}

    def eval_batch(self, model: VAE, x: torch.Tensor) -> Sums:
        t = model.terms(model, x)
        mu = t["mu"]
        moments = {f"_mu1_{j}": mu[:, j].sum() for j in range(mu.shape[1])}
        moments |= {f"_mu2_{j}": mu[:, j].pow(2).sum() for j in range(mu.shape[1])}
        return {"loss": model.loss(t, model.cfg.beta).sum(), **{k: t[k].sum() for k in ELBO_TERMS}, **moments,
                "n": x.new_tensor(len(x))}

    def finalize(self, model: VAE, means: dict[str, float]) -> dict[str, float]:
        """Var_x(E_q[z_j|x]) = E[mu_j^2] - E[mu_j]^2 from the moments, as the count of active units."""
        out = {k: v for k, v in means.items() if not k.startswith("_mu")}
        if "_mu1_0" in means:
            out["active_units"] = active_units(means[f"_mu2_{j}"] - means[f"_mu1_{j}"] ** 2
                                               for j in range(model.cfg.latent_dim))
        return out


class Denoising(Objective):
    """Ho et al. 2020: one step on L_simple at a fresh t and eps per image."""

    def train_batch(self, model: DDPM, net: nn.Module, x: torch.Tensor, update: Update) -> Sums:
        loss = model.loss(net, x)
        update("main", loss.mean())
        return {"loss": loss.detach().sum(), "n": x.new_tensor(len(x))}

    def eval_batch(self, model: DDPM, x: torch.Tensor) -> Sums:
        return {"loss": model.loss(model, x).sum(), "n": x.new_tensor(len(x))}


OBJECTIVES: dict[type[GenerativeModel], Objective] = {
    GAN: Adversarial(), WGAN: Wasserstein(), VAE: Variational(), DDPM: Denoising()}


def objective_for(model: GenerativeModel) -> Objective:
    """The objective of the model's class or its nearest base class in `OBJECTIVES`."""
    for cls in type(model).__mro__:
        if cls in OBJECTIVES:
            return OBJECTIVES[cls]
    raise TypeError(f"{type(model).__name__}: no generative objective; add one to "
                    "raycraft.generative.objectives.OBJECTIVES.")
