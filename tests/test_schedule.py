"""The forward process against method.md §1.7's reference values, and the posterior's Gaussian identities."""

import math

import pytest
import torch

from ddaebm.config import DiffusionConfig
from ddaebm.diffusion.schedule import (build_schedule, diffuse_pair, importance_weight, log_transition,
                                       marginal_variance, posterior_mean, time_grid, transition_score)

# (config, ᾱ_0..ᾱ_4, σ_1..σ_4, σ̃²_0..σ̃²_3) from method.md §1.7
REFERENCE = {
    "cifar": (dict(beta_min=0.1, beta_max=20.0),
              [.99989, .52169, .078667, 3.4285e-3, 4.3186e-5], [.69156, .92152, .97797, .99368],
              [1.0993e-4, .44087, .88421, .98406]),
    "lsun_drl": (dict(beta_min=0.1, beta_max=20.0, grid="drl"),
                 [1.0, .74726, .32234, .080264, 8.03e-5], [.50274, .75408, .86660, .99950],
                 [0.0, .21208, .55333, .91889]),
    "mnist": (dict(beta_min=0.1, beta_max=10.0),
              [.9999, .7144, .27526, .0572, .00641], [.53434, .78402, .89006, .94231],
              [1.05e-4, .24223, .60898, .84256]),
    "toy_official": (dict(beta_min=0.01, beta_max=0.1, clamp_beta=None),
                     [.99999, .99468, .98385, .96770, .94649], [.0729, .1043, .1281, .1481],
                     [1.0e-5, 3.59e-3, 8.21e-3, 1.32e-2]),
}


def _close(actual, expected, rel):
    for a, e in zip(actual, expected):
        assert a == pytest.approx(e, rel=rel, abs=1e-6 if e == 0 else 0), (actual, expected)


@pytest.mark.parametrize("name", REFERENCE)
def test_reference_values(name):
    kw, alpha_bar, sigma, post_var = REFERENCE[name]
    s = build_schedule(DiffusionConfig(**kw))
    # The table is printed to 3-5 significant figures; compare at the precision it gives.
    _close(s.alpha_bar.tolist(), alpha_bar, 1e-3)
    _close(s.sigma[1:].tolist(), sigma, 1e-3)
    _close(s.post_var.tolist(), post_var, 2e-3 if name != "toy_official" else 1e-2)


def test_cifar_posterior_coefficients():
    s = build_schedule(DiffusionConfig(beta_min=0.1, beta_max=20.0))
    _close(s.post_c1.tolist(), [.99983, .66574, .26918, .05782], 1e-3)
    _close(s.post_c2.tolist(), [1.66e-4, .20160, .19300, .11185], 2e-3)


def test_drl_grid_and_clamp():
    assert (time_grid(4, "drl", 1e-3) * 999).round().tolist() == [0, 166, 332, 498, 999]
    s = build_schedule(DiffusionConfig(grid="drl"))
    assert s.beta[4].item() == pytest.approx(0.999)  # clamped from .99946 (method.md §1.7)
    unclamped = build_schedule(DiffusionConfig(grid="drl", clamp_beta=None))
    assert unclamped.beta[4].item() == pytest.approx(0.99946, rel=1e-4)


@pytest.mark.parametrize("kw", [dict(), dict(beta_max=10.0), dict(beta_min=0.01, beta_max=0.1)])
def test_product_of_one_minus_beta_is_one_minus_var(kw):
    cfg = DiffusionConfig(clamp_beta=None, **kw)
    s = build_schedule(cfg)
    var = marginal_variance(time_grid(4, "eps", cfg.eps), cfg.beta_min, cfg.beta_max)
    torch.testing.assert_close(torch.cumprod(1 - s.beta.double(), 0), 1 - var, rtol=1e-6, atol=1e-7)


def test_ddgan_first_beta_and_geometric_variance():
    s = build_schedule(DiffusionConfig(first_beta="ddgan"))
    assert s.beta[0].item() == pytest.approx(1e-8)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(marginal_variance(t, 0.1, 20.0, "geometric"),
                               torch.tensor([0.1, 0.1 * 200**0.5, 20.0], dtype=torch.float64))


def test_importance_weight_lsun_values():
    t = time_grid(4, "drl", 1e-3)[1:]
    _close(importance_weight(t, 0.6, 0.2).tolist(), [.0349, .1047, .1991, .6], 2e-3)
    assert importance_weight(torch.tensor([0.5, 1.0]), 0.6, 0.2).tolist() == pytest.approx([0.2, 0.6])
    assert torch.all(importance_weight(t, 1.0, 1.0) == 1.0)


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_posterior_identity_monte_carlo(k):
    """x_k ~ q(x_k | x₀), x_{k+1} | x_k: regressing x_k on x_{k+1} recovers μ̃ and σ̃² (method.md §1.6, §13)."""
    s = build_schedule(DiffusionConfig(beta_min=0.1, beta_max=20.0))
    g = torch.Generator().manual_seed(k)
    n, x0 = 1_000_000, 0.7
    kk = torch.full((n,), k)
    x_k, x_k1 = diffuse_pair(s, torch.full((n, 1), x0), kk, torch.randn(n, 1, generator=g),
                             torch.randn(n, 1, generator=g))
    x_k, x_k1 = x_k.double().squeeze(1), x_k1.double().squeeze(1)
    # Bayes for jointly Gaussian (x_k, x_{k+1}) given x₀: E[x_k | x_{k+1}] is linear in x_{k+1}.
    cov = torch.cov(torch.stack([x_k, x_k1]))
    slope = cov[0, 1] / cov[1, 1]
    intercept = x_k.mean() - slope * x_k1.mean()
    resid_var = cov[0, 0] - cov[0, 1] ** 2 / cov[1, 1]
    assert slope.item() == pytest.approx(s.post_c2[k].item(), rel=2e-2, abs=2e-3)
    assert intercept.item() == pytest.approx(s.post_c1[k].item() * x0, rel=2e-2, abs=2e-3)
    assert resid_var.item() == pytest.approx(s.post_var[k].item(), rel=2e-2)
    mu = posterior_mean(s, torch.tensor([[x0]]), torch.tensor([[0.3]]), torch.tensor([k]))
    assert mu.item() == pytest.approx(s.post_c1[k].item() * x0 + s.post_c2[k].item() * 0.3, rel=1e-6)


def test_log_transition_and_its_score():
    s = build_schedule(DiffusionConfig())
    g = torch.Generator().manual_seed(0)
    x_k, x_k1, k = torch.randn(5, 2, generator=g), torch.randn(5, 2, generator=g), torch.tensor([0, 1, 2, 3, 1])
    a, var = s.a[k + 1, None], s.beta[k + 1, None]
    expected = (-0.5 * (x_k1 - a * x_k) ** 2 / var - 0.5 * torch.log(2 * math.pi * var)).sum(1)
    torch.testing.assert_close(log_transition(s, x_k, x_k1, k), expected)
    x = x_k.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(log_transition(s, x, x_k1, k).sum(), x)
    torch.testing.assert_close(transition_score(s, x_k, x_k1, k), grad)


def test_explicit_variances():
    s = build_schedule(DiffusionConfig(variance="explicit", variances=[1e-4, 0.1, 0.4, 0.8, 0.9999], clamp_beta=None))
    torch.testing.assert_close(s.alpha_bar.double(),
                               1 - torch.tensor([1e-4, 0.1, 0.4, 0.8, 0.9999], dtype=torch.float64),
                               rtol=1e-6, atol=1e-7)
