"""The generative family's equations against references, and its bad inputs (no Ray needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

from raycraft.data.base import cache_dir
from raycraft.errors import UserError
from raycraft.generative.metrics import classifier_for, frechet_distance, mode_coverage
from raycraft.generative.objectives import Adversarial, Variational, Wasserstein, objective_for
from raycraft.generative.step import GenerativeStep
from raycraft.models.ddpm import DDPM, DDPMConfig, beta_schedule
from raycraft.models.gan import (
    GAN,
    WGAN,
    GANConfig,
    WGANConfig,
    discriminator_loss,
    generator_loss,
    gradient_penalty,
)
from raycraft.models.generative import GenerativeModel
from raycraft.models.vae import VAE, VAEConfig, gaussian_kl
from raycraft.registry import create_model
from raycraft.train.config import build_config
from raycraft.train.loop import Updater

DIGITS = {"input_shape": (1, 8, 8), "num_classes": 10}


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_closed_form_q_xt_x0_matches_sequential_noising(schedule):
    torch.manual_seed(0)
    T = 40
    model = DDPM(DDPMConfig(timesteps=T, schedule=schedule, channel_mults=[1], sample_steps=1), (1, 2, 2))
    x0 = torch.tensor([-1.0, -0.3, 0.4, 1.0]).view(1, 1, 2, 2)
    x = x0.repeat(40_000, 1, 1, 1)
    betas = beta_schedule(schedule, T).float()
    for t in range(T):  # q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)
        x = (1 - betas[t]).sqrt() * x + betas[t].sqrt() * torch.randn_like(x)
        if t in (T // 4, T - 1):
            abar = torch.prod(1 - betas[:t + 1])
            closed = model.q_sample(x0.expand(len(x), -1, -1, -1), torch.full((len(x),), t), torch.randn_like(x))
            for samples in (x, closed):  # both against N(sqrt(abar_t) x_0, (1 - abar_t) I), 5 standard errors
                assert torch.allclose(samples.mean(0), abar.sqrt() * x0[0], atol=0.025)
                assert torch.allclose(samples.var(0), (1 - abar).expand(1, 2, 2), atol=0.035)


def test_cosine_schedule_follows_its_abar_formula():
    T, s = 100, 0.008
    abar = torch.cumprod(1 - beta_schedule("cosine", T), 0)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    assert abar[49].item() == pytest.approx(f(50) / f(0), rel=1e-6)


def test_gaussian_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(5, 7), torch.randn(5, 7)
    ref = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(1)
    assert torch.allclose(gaussian_kl(mu, logvar), ref, atol=1e-5)


def test_elbo_is_log_likelihood_minus_kl_and_matches_monte_carlo():
    torch.manual_seed(0)
    vae = VAE(VAEConfig(latent_dim=3, width=8), (1, 8, 8))
    x = (torch.rand(4, 1, 8, 8) > 0.5).float()
    eps = torch.randn(4, 3)
    t = vae.terms(vae, x, eps)
    mu, logvar = vae.encoder(x).chunk(2, 1)
    z = mu + (0.5 * logvar).exp() * eps
    log_px = Bernoulli(logits=vae.decoder(z)).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(t["elbo"], log_px - kl_divergence(Normal(mu, (0.5 * logvar).exp()),
                                                            Normal(0.0, 1.0)).sum(1), atol=1e-4)
    # the estimator's mean over eps equals E_q[log p(x|z) + log p(z) - log q(z|x)] (no closed-form KL)
    with torch.no_grad():
        n = 4000
        eps = torch.randn(n, 3)
        xs = x[:1].expand(n, -1, -1, -1)
        analytic = vae.terms(vae, xs, eps)["elbo"].mean()
        q = Normal(mu[:1], (0.5 * logvar[:1]).exp())
        z = q.mean + q.stddev * eps
        full = (Bernoulli(logits=vae.decoder(z)).log_prob(xs).flatten(1).sum(1)
                + Normal(0.0, 1.0).log_prob(z).sum(1) - q.log_prob(z).sum(1)).mean()
    assert analytic.item() == pytest.approx(full.item(), abs=0.05 * abs(full.item()))


def test_kl_annealing_ramps_the_kl_weight():
    vae = VAE(VAEConfig(beta=2.0, kl_warmup_epochs=4), (1, 8, 8))
    weights = []
    for epoch in range(6):
        vae.start_epoch(epoch)
        weights.append(vae.kl_weight)
    assert weights == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]


def test_vae_trains_on_the_annealed_kl_weight_and_evaluates_on_beta():
    torch.manual_seed(0)
    cfg, model_cfg = build_config({"model": "vae", "dataset": "digits"},
                                  ["width=4", "latent_dim=3", "beta=2.0", "kl_warmup_epochs=4"])
    vae = create_model("vae", model_cfg, DIGITS)
    step = GenerativeStep()
    step.start_epoch(vae, 1)  # beta_1 = 2 * 1/4
    x = torch.rand(6, 1, 8, 8)
    train = step.train_batch(vae, (x,), Updater(step, vae, cfg, 10, torch.device("cpu")))
    assert train["kl_weight"].item() == pytest.approx(0.5 * 6)
    assert train["loss"].item() == pytest.approx((train["recon"] + 0.5 * train["kl"]).item(), rel=1e-5)
    ev = step.eval_batch(vae, (x,))
    assert ev["loss"].item() == pytest.approx((ev["recon"] + 2.0 * ev["kl"]).item(), rel=1e-5)
    means = step.finalize({k: (v / ev["n"]).item() for k, v in ev.items() if k != "n"})
    assert 0 <= means["active_units"] <= 3 and not any(k.startswith("_mu") for k in means)


def test_each_model_kind_gets_its_objective_and_an_unknown_one_is_named():
    gan, wgan = GAN(GANConfig(width=4), (1, 8, 8)), WGAN(WGANConfig(width=4), (1, 8, 8))
    assert type(objective_for(gan)) is Adversarial and type(objective_for(wgan)) is Wasserstein

    class BetaVAE(VAE):  # a subclass trains as its base does
        pass

    assert type(objective_for(BetaVAE(VAEConfig(width=4), (1, 8, 8)))) is Variational
    with pytest.raises(TypeError, match="Plain: no generative objective"):
        objective_for(type("Plain", (GenerativeModel,), {})(GANConfig(), (1, 8, 8)))


def test_gan_losses_match_their_formulas():
    torch.manual_seed(0)
    real, fake = torch.randn(6), torch.randn(6)
    d_real, d_fake = torch.sigmoid(real), torch.sigmoid(fake)
    assert discriminator_loss(real, fake).item() == pytest.approx(
        (-(d_real.log()) - (1 - d_fake).log()).mean().item(), rel=1e-5)
    assert generator_loss(fake, "minimax").item() == pytest.approx((1 - d_fake).log().mean().item(), rel=1e-5)
    assert generator_loss(fake, "non_saturating").item() == pytest.approx(-d_fake.log().mean().item(), rel=1e-5)


def test_gradient_penalty_of_a_linear_critic():
    w = torch.randn(1, 16)
    critic = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 1, bias=False))
    critic[1].weight.data = w
    pen = gradient_penalty(critic, torch.randn(5, 1, 4, 4), torch.randn(5, 1, 4, 4))
    assert pen.item() == pytest.approx((w.norm().item() - 1) ** 2, rel=1e-5)  # grad f = w everywhere


@pytest.mark.parametrize("clip", [0.01, None])
def test_weight_clipping_holds_after_every_critic_step(clip):
    torch.manual_seed(0)
    cfg, model_cfg = build_config({"model": "wgan", "dataset": "digits"},
                                  [f"clip={'null' if clip is None else clip}", "n_critic=3", "width=4",
                                   "optim.name=sgd", "optim.lr=1.0"])
    model = create_model("wgan", model_cfg, DIGITS)
    step = GenerativeStep()
    updater = Updater(step, model, cfg, 10, torch.device("cpu"))
    extremes = []

    def update(name, loss):
        updater(name, loss)
        if name == "discriminator":  # the clip follows the optimizer step: look right after it, from the next call
            extremes.append(None)

    def recording_update(name, loss):
        if extremes:
            extremes[-1] = max(p.abs().max().item() for p in model.discriminator.parameters())
        update(name, loss)

    step.train_batch(model, (torch.rand(12, 1, 8, 8),), recording_update)
    assert len(extremes) == 3  # n_critic critic steps per generator step
    bound = max(p.abs().max().item() for p in model.discriminator.parameters())
    if clip is None:  # the test can fail: without clipping lr=1 SGD pushes weights far out
        assert bound > 0.05
    else:
        assert all(e is not None and e <= clip + 1e-7 for e in extremes) and bound <= clip + 1e-7


def test_frechet_distance_matches_scipy_sqrtm():
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 5)), rng.normal(1.0, 2.0, size=(300, 5)) @ rng.normal(size=(5, 5))
    m1, m2, s1, s2 = a.mean(0), b.mean(0), np.cov(a.T), np.cov(b.T)
    ref = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * sqrtm(s1 @ s2).real)
    got = frechet_distance(*(torch.as_tensor(v) for v in (m1, s1, m2, s2)))
    assert got == pytest.approx(ref, rel=1e-6)
    assert frechet_distance(*(torch.as_tensor(v) for v in (m1, s1, m1, s1))) == pytest.approx(0, abs=1e-8)


def test_mode_coverage_sees_collapse():
    uniform = mode_coverage(torch.arange(1000) % 10, 10)
    collapsed = mode_coverage(torch.full((1000,), 3), 10)
    assert uniform == {"mode_kl": pytest.approx(0, abs=1e-12), "classes_covered": 10.0}
    assert collapsed == {"mode_kl": pytest.approx(math.log(10)), "classes_covered": 1.0}


def test_fid_classifier_trains_on_first_use_even_under_no_grad(tmp_path, monkeypatch):
    """A fresh machine has no cached classifier: a run's end-of-run metrics (under no_grad) train it."""
    monkeypatch.setenv("RAYCRAFT_CACHE", str(tmp_path))
    with torch.no_grad():
        clf = classifier_for("digits")
    assert clf.accuracy > 0.9 and (cache_dir() / "fid" / "digits.pt").is_file()
    assert classifier_for("digits").accuracy == clf.accuracy  # the second call loads the cache


def test_ddim_with_all_steps_and_ancestral_return_images_in_range():
    torch.manual_seed(0)
    model = DDPM(DDPMConfig(timesteps=10, channel_mults=[1, 2], width=8, sample_steps=10), (1, 8, 8)).eval()
    for sampler in ("ddim", "ancestral"):
        x = model.sample(3, sampler=sampler)
        assert x.shape == (3, 1, 8, 8) and 0 <= x.min() and x.max() <= 1


def test_ddim_eta_zero_is_deterministic_and_eta_one_is_not():
    torch.manual_seed(0)
    model = DDPM(DDPMConfig(timesteps=20, channel_mults=[1, 2], width=8, sample_steps=5), (1, 8, 8)).eval()
    x_T = model.noise(4, torch.Generator().manual_seed(0))
    a, b = (model.denoise(x_T, "ddim", 5, 0.0, torch.Generator().manual_seed(s)) for s in (1, 2))
    assert torch.equal(a, b)  # eta = 0: the sample is a function of x_T alone
    c, d = (model.denoise(x_T, "ddim", 5, 1.0, torch.Generator().manual_seed(s)) for s in (1, 2))
    assert not torch.allclose(c, d)
    with pytest.raises(UserError, match="ddim_eta"):
        DDPMConfig(ddim_eta=-1.0)


def test_epoch_grids_and_vae_extras(tmp_path):
    step = GenerativeStep()
    vae = VAE(VAEConfig(width=4, latent_dim=4, grid_samples=9), (1, 8, 8))
    step.eval_batch(vae, (torch.rand(10, 1, 8, 8),))
    step.epoch_artifacts(vae, 0, DIGITS, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latent_traversal.png", "reconstructions.png",
                                                          "samples.png"]


def test_gan_trains_only_its_own_player():
    torch.manual_seed(0)
    cfg, model_cfg = build_config({"model": "gan", "dataset": "digits"}, ["width=4"])
    model = create_model("gan", model_cfg, DIGITS)
    updater = Updater(GenerativeStep(), model, cfg, 10, torch.device("cpu"))
    assert set(updater.optimizers) == {"generator", "discriminator"}
    g_before = [p.clone() for p in model.generator.parameters()]
    d_before = [p.clone() for p in model.discriminator.parameters()]
    loss = model.g_loss(model, 4)
    updater("generator", loss)
    assert all(torch.equal(a, b) for a, b in zip(d_before, model.discriminator.parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(g_before, model.generator.parameters(), strict=True))


def test_unet_rejects_an_image_it_cannot_halve_evenly():
    with pytest.raises(UserError, match=r"channel_mults: \[1, 2, 2, 2\].*28x28 does not divide by 8"):
        create_model("ddpm", DDPMConfig(channel_mults=[1, 2, 2, 2]), {"input_shape": (1, 28, 28)})


def test_bad_ddpm_input_is_refused_before_ray_starts():
    from raycraft.runner import prepare

    cfg, _ = build_config({"model": "ddpm", "dataset": "digits"}, ["channel_mults=[1,2,2,2,2]"])
    with pytest.raises(UserError, match="8x8 does not divide by 16"):
        prepare(cfg)


def test_generative_models_refuse_images_not_divisible_by_4():
    with pytest.raises(UserError, match="divisible by 4"):
        create_model("gan", GANConfig(), {"input_shape": (1, 30, 30)})


def test_generative_and_classification_models_share_image_datasets():
    from raycraft.registry import check_compatible, dataset_spec

    assert dataset_spec("mnist5k").tasks == ("classification", "generative")
    check_compatible("vae", "mnist5k")
    check_compatible("lenet5", "mnist5k")


def test_wgan_config_rejects_bad_values():
    with pytest.raises(UserError, match="n_critic"):
        WGANConfig(n_critic=0)
    with pytest.raises(UserError, match="clip"):
        WGANConfig(clip=-1.0)


