"""The deep Kalman filter's pieces: the Gaussian KL against torch.distributions, the ELBO terms, missing data."""

from __future__ import annotations

import math

import torch

from raycraft.models.deep_kalman import DeepKalmanConfig, DeepKalmanFilter, gaussian_kl


def test_gaussian_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu_q, mu_p = torch.randn(5, 3), torch.randn(5, 3)
    var_q, var_p = torch.rand(5, 3) + 0.1, torch.rand(5, 3) + 0.1
    Normal = torch.distributions.Normal
    ref = torch.distributions.kl_divergence(Normal(mu_q, var_q.sqrt()), Normal(mu_p, var_p.sqrt())).sum(-1)
    assert torch.allclose(gaussian_kl(mu_q, var_q, mu_p, var_p), ref, atol=1e-6)


def test_elbo_terms_are_kl_minus_the_emission_log_likelihood():
    torch.manual_seed(1)
    model = DeepKalmanFilter(DeepKalmanConfig(latent_dim=2, hidden=8), 2, [1.0, -1.0], [2.0, 0.5])
    y = torch.randn(4, 7, 2, dtype=torch.float64)
    y[0, 3] = float("nan")
    torch.manual_seed(2)
    elbo, counted = model(y)
    nll = -elbo
    assert nll.shape == (4, 7) and counted.all() and torch.isfinite(nll).all()
    # recompute step (1, 5) by hand from the same random path
    torch.manual_seed(2)
    with torch.no_grad():
        mu, var, z, prior_mu, prior_var = model._infer(y, sample=True)
    y_std = (y[1, 5].float() - model.mean) / model.std
    var_y = model.log_var_y.exp()
    emission = torch.distributions.Normal(model.emission(z[1, 5]), var_y.sqrt()).log_prob(y_std).sum()
    log_lik = emission - torch.log(model.std).sum()
    kl = gaussian_kl(mu[1, 5], var[1, 5], prior_mu[1, 5], prior_var[1, 5])
    assert torch.allclose(nll[1, 5], kl - log_lik, atol=1e-5)
    # a missing step keeps only its KL term
    assert torch.allclose(nll[0, 3], gaussian_kl(mu[0, 3], var[0, 3], prior_mu[0, 3], prior_var[0, 3]), atol=1e-5)
    assert math.isclose(prior_var[:, 0].mean().item(), 1.0)  # z_1 ~ N(0, I)


def test_plotted_bands_are_the_posterior_and_its_reconstruction():
    torch.manual_seed(3)
    model = DeepKalmanFilter(DeepKalmanConfig(latent_dim=2, hidden=8), 1, [5.0], [2.0])
    y = torch.randn(2, 9, 1)
    mu = model.posterior_mean(y)
    bands = model.latent_bands(y)
    assert list(bands) == ["z[0]", "z[1]"] and bands["z[1]"].t.tolist() == list(range(9))
    torch.testing.assert_close(bands["z[1]"].mean, mu[0, :, 1])
    assert (bands["z[0]"].sd > 0).all()
    recon = model.reconstruction(y)
    with torch.no_grad():
        want = model.emission(mu[0])[:, 0] * 2.0 + 5.0  # back in data units: F(E[z]) std + mean
    torch.testing.assert_close(recon.mean, want)
    torch.testing.assert_close(recon.sd, (model.log_var_y.exp().sqrt() * 2.0).expand(9))
