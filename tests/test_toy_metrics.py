"""Tests for ddaebm.metrics.toy against independent references (scipy, closed forms)."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from scipy.special import logsumexp
from scipy.stats import wasserstein_distance

from ddaebm.data.toy import sample_toy, toy_modes, true_cell_mass
from ddaebm.metrics.toy import grid_divergences, mmd2, mode_stats, sliced_w1, toy_metrics


def _draw(name: str, n: int, seed: int) -> np.ndarray:
    return sample_toy(name, n, torch.Generator().manual_seed(seed)).double().numpy()


def _mmd2_reference(x, y, hs=(0.05, 0.2, 1.0)):
    """Unbiased MMD² from full O(n²) kernel matrices (scipy distances)."""
    def k(a, b):
        return np.mean([np.exp(-cdist(a, b, "sqeuclidean") / (2 * h * h)) for h in hs], 0)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    m, n = len(x), len(y)
    return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
            - 2 * kxy.mean())


def test_mmd2_matches_reference(monkeypatch):
    import ddaebm.metrics.toy as mt
    monkeypatch.setattr(mt, "_BLOCK", 128)  # exercise the blocking with several partial blocks
    x, y = _draw("25gaussians", 300, 0), _draw("8gaussians", 257, 1)
    assert mmd2(x, y) == pytest.approx(_mmd2_reference(x, y), rel=1e-9, abs=1e-12)
    z = _draw("25gaussians", 300, 2)
    assert mmd2(x, z) == pytest.approx(_mmd2_reference(x, z), rel=1e-9, abs=1e-12)


def test_mmd2_same_vs_different_distribution():
    x, x2 = _draw("25gaussians", 3000, 0), _draw("25gaussians", 3000, 1)
    same = mmd2(x, x2)
    diff = mmd2(x, _draw("8gaussians", 3000, 2))
    assert abs(same) < 2e-3
    assert diff > 0.05 and diff > 50 * abs(same)


def test_sliced_w1_shift():
    x = _draw("pinwheel", 2000, 0)
    d = 0.7
    # Shift by (d, 0): each projection shifts by d·cosθ, so SW1 = d·E|cosθ| = 2d/π.
    assert sliced_w1(x, x + [d, 0.0]) == pytest.approx(2 * d / math.pi, rel=0.02)
    assert sliced_w1(x, x) == 0.0


def test_sliced_w1_1d_matches_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=997), rng.gamma(2.0, size=1500)  # unequal sizes
    # In 1-D every unit direction is ±1 and W1 is sign-invariant, so SW1 = W1.
    got = sliced_w1(a[:, None], b[:, None], n_proj=4)
    assert got == pytest.approx(wasserstein_distance(a, b), rel=1e-10)
    c = rng.normal(size=997)
    assert sliced_w1(a[:, None], c[:, None], n_proj=3) == pytest.approx(
        wasserstein_distance(a, c), rel=1e-10)


def test_sliced_w1_unequal_sizes_projection_by_projection():
    import ddaebm.metrics.toy as mt
    x, y = _draw("8gaussians", 600, 3), _draw("rings", 451, 4)
    dirs = mt._directions(2, 16, np.random.default_rng(5))
    ref = np.mean([wasserstein_distance(x @ u, y @ u) for u in dirs])
    assert sliced_w1(x, y, n_proj=16, seed=5) == pytest.approx(ref, rel=1e-10)


def test_mode_stats_true_25gaussians():
    x = _draw("25gaussians", 2500, 0)
    centres, std = toy_modes("25gaussians")
    s = mode_stats(x, centres.numpy(), std)
    assert s["modes_covered"] == 25 and s["modes_total"] == 25
    # Rayleigh: P(‖ε‖ ≤ 3σ) = 1 − e^{−4.5} = 0.9889 for an isotropic 2-D Gaussian.
    assert s["frac_within_3sigma"] == pytest.approx(1 - math.exp(-4.5), abs=0.01)


def test_mode_stats_counts_missing_modes():
    x = _draw("25gaussians", 2500, 0)
    centres, std = toy_modes("25gaussians")
    keep = np.linalg.norm(x, axis=1) < 1.2  # drop the outer ring of 16 modes
    s = mode_stats(x[keep], centres.numpy(), std)
    assert s["modes_covered"] == 9


def test_grid_divergences_identical_and_peaked():
    rng = np.random.default_rng(0)
    p = rng.random((20, 20))
    p /= p.sum()
    r = grid_divergences(np.log(p) + 7.0, p)  # unnormalised: any additive constant
    assert r["grid_kl"] == pytest.approx(0.0, abs=1e-12)
    assert r["grid_tv"] == pytest.approx(0.0, abs=1e-12)
    logd = np.full((20, 20), -1e4)
    logd[3, 4] = 0.0
    r = grid_divergences(logd, p)
    assert all(np.isfinite(v) for v in r.values())
    assert r["grid_tv"] == pytest.approx(1 - p[3, 4])


def _exact_log_density_25(side: np.ndarray) -> np.ndarray:
    """log of the 25gaussians mixture density at the grid points (x = side[j], y = side[i])."""
    centres, std = toy_modes("25gaussians")
    xx, yy = np.meshgrid(side, side)
    d2 = ((np.stack([xx, yy], -1)[:, :, None] - centres.double().numpy()) ** 2).sum(-1)
    return logsumexp(-d2 / (2 * std ** 2), axis=-1) - math.log(25 * 2 * math.pi * std ** 2)


def test_grid_kl_calibration_exact_density():
    side = np.linspace(-4, 4, 200)
    r = grid_divergences(_exact_log_density_25(side), true_cell_mass("25gaussians", side))
    print(f"\ncalibration grid_kl = {r['grid_kl']:.5f}, grid_tv = {r['grid_tv']:.5f}")
    # A cell integral is the density blurred by a box of width h (variance h²/12 per axis), so the
    # floor is ≈ KL(N(0, σ²+h²/12) ‖ N(0, σ²)) summed over 2 axes = 2·½(q − 1 − ln q).
    std, h = toy_modes("25gaussians")[1], side[1] - side[0]
    q = 1 + h * h / (12 * std * std)
    assert r["grid_kl"] == pytest.approx(q - 1 - math.log(q), rel=0.05)
    assert 0.003 < r["grid_kl"] < 0.008


def test_toy_metrics_json():
    side = np.linspace(-2, 2, 41)
    samples, data = _draw("25gaussians", 500, 0), _draw("25gaussians", 600, 1)
    out = toy_metrics(samples, data, "25gaussians",
                      log_density=_exact_log_density_25(side), side=side)
    assert set(out) >= {"modes_covered", "modes_total", "frac_within_3sigma", "mmd2",
                        "sliced_w1", "grid_kl", "grid_tv"}
    json.dumps(out)
    assert all(type(v) in (int, float) for v in out.values())
    out2 = toy_metrics(_draw("moons", 300, 0), _draw("moons", 300, 1), "moons")
    assert "modes_covered" not in out2 and "grid_kl" not in out2
