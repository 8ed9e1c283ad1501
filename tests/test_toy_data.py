"""Tests for ddaebm.data.toy: shapes, seeding, method.md §9 geometry and true grid-cell masses."""

import numpy as np
import pytest
import torch

from ddaebm.data.toy import (
    TOY_DATASETS, _histogram_cell_mass, sample_toy, toy_modes, true_cell_mass,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", TOY_DATASETS)
@pytest.mark.parametrize("n", [1, 7, 200])
def test_shape_dtype_finite(name, n):
    x = sample_toy(name, n, _gen(0))
    assert x.shape == (n, 2) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_seeding(name):
    a, b = sample_toy(name, 200, _gen(1)), sample_toy(name, 200, _gen(1))
    c = sample_toy(name, 200, _gen(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_unknown_name_lists_valid():
    with pytest.raises(ValueError, match="25gaussians"):
        sample_toy("nope", 10, _gen(0))


def test_25gaussians_balanced_modes_and_std():
    x = sample_toy("25gaussians", 200, _gen(3)).double()
    centres, std = toy_modes("25gaussians")
    centres = centres.double()
    nearest = torch.cdist(x, centres).argmin(1)
    assert torch.bincount(nearest, minlength=25).tolist() == [8] * 25  # method.md §9: 8 per mode
    resid = x - centres[nearest]
    assert std == pytest.approx(0.1 / 2.828)
    # 400 residuals per coordinate: the std estimate has ~3.5% relative error, so ±10% is safe.
    assert resid.std(0).numpy() == pytest.approx([0.0354, 0.0354], rel=0.1)
    assert sorted(set(np.round(centres[:, 0].numpy(), 3))) == [-1.414, -0.707, 0.0, 0.707, 1.414]


def test_8gaussians_centres_and_std():
    centres, std = toy_modes("8gaussians")
    assert centres.shape == (8, 2)
    assert torch.linalg.norm(centres.double(), dim=1).numpy() == pytest.approx([4 / 1.414] * 8)
    assert std == pytest.approx(0.5 / 1.414)
    x = sample_toy("8gaussians", 20000, _gen(4)).double()
    nearest = torch.cdist(x, centres.double()).argmin(1)
    counts = torch.bincount(nearest, minlength=8).double()
    assert (counts / 20000).numpy() == pytest.approx([1 / 8] * 8, abs=0.015)  # uniform choice
    resid = x - centres.double()[nearest]
    # Nearest-centre assignment barely truncates (modes are 6σ apart), so std ≈ 0.354.
    assert resid.std(0).numpy() == pytest.approx([0.354, 0.354], rel=0.05)


def test_pinwheel_exact_rows_and_balanced_classes():
    x = sample_toy("pinwheel", 203, _gen(5))
    assert x.shape == (203, 2)
    big = sample_toy("pinwheel", 50000, _gen(6)).double()
    r = torch.linalg.norm(big, dim=1)
    assert r.mean().item() == pytest.approx(2.0, abs=0.05)  # |feature| ≈ 1, ×2


def test_odd_counts_other_generators():
    for name in ("2spirals", "moons", "circles"):
        assert sample_toy(name, 203, _gen(7)).shape == (203, 2)


def test_true_cell_mass_sums_to_one_and_sits_on_modes():
    side = np.linspace(-4, 4, 200)
    mass = true_cell_mass("25gaussians", side)
    assert mass.shape == (200, 200)
    assert mass.sum() == pytest.approx(1.0, abs=1e-12)
    centres, std = toy_modes("25gaussians")
    xx, yy = np.meshgrid(side, side)  # [i, j] ↔ (x = side[j], y = side[i])
    pts = np.stack([xx, yy], -1).reshape(-1, 1, 2)
    d = np.linalg.norm(pts - centres.double().numpy()[None], axis=-1).min(1).reshape(200, 200)
    assert mass[d < 5 * std].sum() > 0.999


def test_true_cell_mass_orientation():
    # Rows are y and columns x: 'cos' (y = 2.5 sin x) puts its x < 0 half at y < 0.
    side = np.linspace(-3, 3, 30)
    mass = true_cell_mass("cos", side, n_samples=200_000)
    assert mass.sum() == pytest.approx(1.0)
    neg_x, neg_y = side < 0, side < 0
    assert mass[np.ix_(neg_y, neg_x)].sum() > 0.45  # lower-left quadrant (y < 0, x < 0)
    assert mass[np.ix_(~neg_y, neg_x)].sum() < 0.05


def test_histogram_mass_matches_exact():
    side = np.linspace(-4, 4, 50)
    exact = true_cell_mass("25gaussians", side)
    hist = _histogram_cell_mass("25gaussians", side, 2_000_000, 0)
    tv = 0.5 * np.abs(hist / hist.sum() - exact).sum()
    assert tv < 0.02


def test_exact_mass_matches_quadrature():
    # Independent check of the CDF-product formula: 8×8 midpoint quadrature inside each cell.
    side = np.linspace(-2, 2, 40)
    h = side[1] - side[0]
    centres, std = toy_modes("8gaussians")
    sub = (np.arange(8) + 0.5) / 8 * h - h / 2
    fine = (side[:, None] + sub[None]).ravel()  # 320 fine points, 8 per cell
    xx, yy = np.meshgrid(fine, fine)
    d2 = ((np.stack([xx, yy], -1)[:, :, None] - centres.double().numpy()) ** 2).sum(-1)
    dens = np.exp(-d2 / (2 * std ** 2)).mean(-1)
    quad = dens.reshape(40, 8, 40, 8).sum((1, 3))
    quad /= quad.sum()
    assert np.abs(quad - true_cell_mass("8gaussians", side)).max() < 1e-5
