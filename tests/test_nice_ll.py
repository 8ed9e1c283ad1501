"""NICE exact likelihood (ddaebm/metrics/nice.py) against independent change-of-variables computations."""

import math

import numpy as np
import pytest
import torch

from ddaebm.metrics.nice import exact_samples, is_nice, log_likelihoods, logit_jacobian, summarize
from ddaebm.networks.mnist import NICEEnergy


def _random_nice(dim=8, seed=0) -> NICEEnergy:
    """A small NICE_t whose couplings and scales are all non-trivial (the zero-initialised outputs randomised)."""
    torch.manual_seed(seed)
    nice = NICEEnergy(dim=dim, hidden=16, num_hidden=2, num_couplings=4, num_steps=4, t_emb_dim=8).double()
    with torch.no_grad():
        for c in nice.couplings:
            c.out.weight.normal_(0, 0.5)
            c.out.bias.normal_(0, 0.5)
        nice.log_scale.normal_(0, 0.5)
    return nice.eval()


def _batches(x, size):
    return [(x[i:i + size], None) for i in range(0, len(x), size)]


def _gauss(y):
    return -0.5 * (y ** 2).sum() - 0.5 * len(y) * math.log(2 * math.pi)


def test_log_likelihood_equals_autograd_change_of_variables():
    nice = _random_nice()
    x = torch.randn(12, 8, dtype=torch.float64) * 2
    f, _ = log_likelihoods(nice, _batches(x, 5), "cpu")
    k0 = torch.zeros(1, dtype=torch.long)
    for i in range(len(x)):
        fn = lambda v: nice.transform(v[None], k0)[0][0]  # noqa: E731 - the map x ↦ y at k = 0
        jac = torch.autograd.functional.jacobian(fn, x[i])
        indep = _gauss(fn(x[i])) + torch.linalg.slogdet(jac)[1]
        assert f[i] == pytest.approx(indep.item(), rel=1e-10, abs=1e-9)
    assert summarize(f, np.zeros_like(f), 8)["ll_logit_nats"] == pytest.approx(f.mean())


def test_pixel_space_likelihood_includes_the_logit_jacobian():
    """log p(pixels) = f(logit(p), 0) + log|det ∂x/∂p|, checked through autograd of the composite p ↦ y."""
    nice = _random_nice(seed=1)
    p = torch.rand(6, 8, dtype=torch.float64) * 0.98 + 0.01
    x = torch.logit(p)
    f, jac = log_likelihoods(nice, _batches(x, 4), "cpu")
    k0 = torch.zeros(1, dtype=torch.long)
    for i in range(len(p)):
        fn = lambda v: nice.transform(torch.logit(v)[None], k0)[0][0]  # noqa: E731
        indep = _gauss(fn(p[i])) + torch.linalg.slogdet(torch.autograd.functional.jacobian(fn, p[i]))[1]
        assert f[i] + jac[i] == pytest.approx(indep.item(), rel=1e-10)
    np.testing.assert_allclose(jac, -(torch.log(p) + torch.log1p(-p)).sum(1).numpy(), rtol=1e-12)


def test_zeroed_couplings_give_the_analytic_gaussian():
    """Couplings at their zero initialisation: y = e^{s}·x (permuted), f(x) = log N(e^{s} x; 0, I) + Σs."""
    torch.manual_seed(2)
    nice = NICEEnergy(dim=6, hidden=8, num_hidden=1, num_couplings=2).double().eval()
    s = torch.randn(4, 6, dtype=torch.float64) * 0.3
    with torch.no_grad():
        nice.log_scale.copy_(s)
    x = torch.randn(10, 6, dtype=torch.float64)
    f, _ = log_likelihoods(nice, _batches(x, 10), "cpu")
    xp = x[:, nice.perm]
    analytic = -0.5 * ((xp * s[0].exp()) ** 2).sum(1) - 3 * math.log(2 * math.pi) + s[0].sum()
    np.testing.assert_allclose(f, analytic.numpy(), rtol=1e-12)


def test_summary_conventions_and_limits():
    f, jac = np.array([-900.0, -860.0]), np.array([3000.0, 3100.0])
    out = summarize(f, jac, 784)
    assert out["ll_logit_nats"] == -880.0
    assert out["bpd_logit"] == pytest.approx(880 / (784 * math.log(2)))
    assert out["ll_pixel_nats"] == pytest.approx(-880 + 3050)
    assert out["bpd_pixel"] == pytest.approx((880 - 3050) / (784 * math.log(2)) + 8)
    x = torch.randn(3, 5, dtype=torch.float64)
    f2, _ = log_likelihoods(_random_nice(dim=10), _batches(torch.randn(9, 10, dtype=torch.float64), 4), "cpu", num=7)
    assert len(f2) == 7
    assert logit_jacobian(x).shape == (3,)
    with pytest.raises(ValueError, match="non-finite"):
        summarize(np.array([np.nan]), np.zeros(1), 784)


def test_exact_samples_invert_the_flow():
    nice = _random_nice(seed=3)
    assert is_nice(nice) and not is_nice(torch.nn.Linear(2, 2))
    x = exact_samples(nice, 5, seed=7)
    y, _ = nice.transform(x, torch.zeros(5, dtype=torch.long))
    # The same seed draws the same y ~ N(0, I) (as a float32 CPU draw), which the samples map back to.
    y_drawn = torch.randn(5, 8, generator=torch.Generator().manual_seed(7)).double()
    torch.testing.assert_close(y, y_drawn, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(exact_samples(nice, 5, seed=7), x)
