"""Seedable, vectorised 2-D toy distributions (method.md §9) and their true grid-cell masses.

Every sampler takes all of its randomness from an explicit ``torch.Generator`` and builds a
whole batch with a handful of tensor ops (no Python loop over points), so a training run is
reproducible from its seed and data generation costs microseconds per batch.

Where the official ``toy_data.py`` cannot return exactly ``n`` rows (pinwheel drops the
remainder of n/5, 2spirals of n/2), we spread the points as evenly as possible over the
classes so that the output always has ``n`` rows; the geometry is unchanged.

``true_cell_mass`` gives the probability of each cell of an evaluation grid under the TRUE
distribution: exact (Gaussian CDF products) for the two Gaussian mixtures, a large seeded
histogram otherwise. ``ddaebm.metrics.toy.grid_divergences`` scores a model density against it.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

TOY_DATASETS: tuple[str, ...] = (
    "25gaussians", "8gaussians", "pinwheel", "swissroll", "checkerboard", "2spirals",
    "rings", "moons", "circles", "line", "cos",
)

# method.md §9: the official code divides the 25-Gaussian grid by 2.828 and the 8-Gaussian ring by
# 1.414 (rounded √8 and √2); we keep the rounded constants so coordinates match the paper's.
_SCALE_25 = 2.828
_STD_25 = 0.1
_SCALE_8 = 1.414
_STD_8 = 0.5


def _grid25_centres() -> np.ndarray:
    """Unscaled 25gaussians centres (2i, 2j), i, j ∈ {−2..2}, in cyclic build order (method.md §9)."""
    i, j = np.meshgrid(np.arange(-2, 3), np.arange(-2, 3), indexing="ij")
    return np.stack([2.0 * i.ravel(), 2.0 * j.ravel()], axis=1)


def _ring8_centres() -> np.ndarray:
    """Unscaled 8gaussians centres 4·(cos, sin)(k·45°) (method.md §9)."""
    ang = np.arange(8) * (np.pi / 4)
    return 4.0 * np.stack([np.cos(ang), np.sin(ang)], axis=1)


# float32 copies reused by every batch: building them per call would dominate the sampling time.
_C25 = torch.from_numpy(_grid25_centres()).float()
_C8 = torch.from_numpy(_ring8_centres()).float()


def _randn(n: int, g: torch.Generator) -> torch.Tensor:
    """[n, 2] standard normal draws from ``g``."""
    return torch.randn(n, 2, generator=g)


def _rand(n: int, g: torch.Generator) -> torch.Tensor:
    """[n] uniform draws on [0, 1) from ``g``."""
    return torch.rand(n, generator=g)


def _shuffle(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Rows of ``x`` in a random order (the official samplers permute class-ordered batches)."""
    return x[torch.randperm(x.shape[0], generator=g)]


def _sample_25gaussians(n: int, g: torch.Generator) -> torch.Tensor:
    """25gaussians: point m uses centre m mod 25 (official fixed cyclic order, so B=200 gives
    exactly 8 per mode), + N(0, 0.1²), shuffled, then /2.828 (method.md §9)."""
    idx = torch.arange(n) % 25
    x = _C25[idx] + _STD_25 * _randn(n, g)
    return _shuffle(x, g) / _SCALE_25


def _sample_8gaussians(n: int, g: torch.Generator) -> torch.Tensor:
    """8gaussians: uniformly chosen centre + N(0, 0.5²), then /1.414 (method.md §9)."""
    idx = torch.randint(0, 8, (n,), generator=g)
    return (_C8[idx] + _STD_8 * _randn(n, g)) / _SCALE_8


def _sample_pinwheel(n: int, g: torch.Generator) -> torch.Tensor:
    """pinwheel: 5 classes, features (r, s) ~ N((1, 0), diag(.3², .1²)), angle 2πc/5 + .25·e^r,
    rotated, ×2, permuted (method.md §9). Class of point m is m mod 5, so the classes hold ⌊n/5⌋ or
    ⌈n/5⌉ points and the output has exactly n rows (the official drops the remainder)."""
    cls = torch.arange(n) % 5
    f = _randn(n, g) * torch.tensor([0.3, 0.1])
    f[:, 0] += 1.0
    ang = cls * (2 * math.pi / 5) + 0.25 * torch.exp(f[:, 0])
    c, s = torch.cos(ang), torch.sin(ang)
    # The official applies the rotation matrix from the right (row vector · R), i.e. it rotates
    # by −angle; we keep that so the arms curl the same way as in the paper's figures.
    x = torch.stack([f[:, 0] * c + f[:, 1] * s, -f[:, 0] * s + f[:, 1] * c], dim=1)
    return 2.0 * _shuffle(x, g)


def _sample_swissroll(n: int, g: torch.Generator) -> torch.Tensor:
    """swissroll: make_swiss_roll(n, noise=1) semantics, columns (x, z), /5 (method.md §9)."""
    u = 1.5 * math.pi * (1 + 2 * _rand(n, g))
    x = torch.stack([u * torch.cos(u), u * torch.sin(u)], dim=1) + _randn(n, g)
    return x / 5.0


def _sample_checkerboard(n: int, g: torch.Generator) -> torch.Tensor:
    """checkerboard: x₁ ~ U[−2, 2]; x₂ = U[0,1) − 2·Bernoulli(½) + (⌊x₁⌋ mod 2); ×2 (method.md §9)."""
    x1 = 4 * _rand(n, g) - 2
    flip = torch.randint(0, 2, (n,), generator=g).float()
    x2 = _rand(n, g) - 2 * flip + torch.remainder(torch.floor(x1), 2)
    return 2.0 * torch.stack([x1, x2], dim=1)


def _sample_2spirals(n: int, g: torch.Generator) -> torch.Tensor:
    """2spirals: t = √U·3π; arm (−t cos t + .5U, t sin t + .5U); the second half of the batch is
    the negated arm; /3, + N(0, .1²) (method.md §9). Odd n gives the first arm one extra point."""
    t = torch.sqrt(_rand(n, g)) * (3 * math.pi)
    arm = torch.stack([-t * torch.cos(t), t * torch.sin(t)], dim=1) + 0.5 * torch.rand(n, 2, generator=g)
    sign = torch.where(torch.arange(n) < (n + 1) // 2, 1.0, -1.0)
    return sign[:, None] * arm / 3.0 + 0.1 * _randn(n, g)


def _sample_rings(n: int, g: torch.Generator) -> torch.Tensor:
    """rings: radius 3·{1, .75, .5, .25} (equal shares), uniform angle, + N(0, .08²) (method.md §9).
    The official subsamples (with replacement) 20n evenly spaced points, 5n per ring; a uniform
    ring and a continuous uniform angle is the same distribution up to that 1/(5n) angle grid."""
    radius = 3.0 * (1.0 - 0.25 * torch.randint(0, 4, (n,), generator=g).float())
    ang = 2 * math.pi * _rand(n, g)
    x = radius[:, None] * torch.stack([torch.cos(ang), torch.sin(ang)], dim=1)
    return x + 0.08 * _randn(n, g)


def _sample_moons(n: int, g: torch.Generator) -> torch.Tensor:
    """moons: make_moons(noise .1) semantics with uniform (not evenly spaced) angles: ⌊n/2⌋ on the
    outer arc (cos t, sin t), the rest on (1 − cos t, .5 − sin t), t ∈ [0, π]; shuffled."""
    t = math.pi * _rand(n, g)
    outer = torch.arange(n) < n // 2
    x = torch.where(outer, torch.cos(t), 1 - torch.cos(t))
    y = torch.where(outer, torch.sin(t), 0.5 - torch.sin(t))
    return _shuffle(torch.stack([x, y], dim=1), g) + 0.1 * _randn(n, g)


def _sample_circles(n: int, g: torch.Generator) -> torch.Tensor:
    """circles: make_circles(factor .5, noise .08) ×3 (method.md §9): ⌊n/2⌋ points on the unit circle,
    the rest on radius .5, uniform angles, noise added before the ×3 as in sklearn; shuffled."""
    radius = torch.where(torch.arange(n) < n // 2, 1.0, 0.5)
    ang = 2 * math.pi * _rand(n, g)
    x = radius[:, None] * torch.stack([torch.cos(ang), torch.sin(ang)], dim=1)
    return 3.0 * (_shuffle(x, g) + 0.08 * _randn(n, g))


def _sample_line(n: int, g: torch.Generator) -> torch.Tensor:
    """line: x ~ U[−2.5, 2.5], y = x (method.md §9)."""
    x = 5 * _rand(n, g) - 2.5
    return torch.stack([x, x], dim=1)


def _sample_cos(n: int, g: torch.Generator) -> torch.Tensor:
    """cos: x ~ U[−2.5, 2.5], y = 2.5·sin x (method.md §9; the official name is 'cos')."""
    x = 5 * _rand(n, g) - 2.5
    return torch.stack([x, 2.5 * torch.sin(x)], dim=1)


_SAMPLERS: dict[str, Callable[[int, torch.Generator], torch.Tensor]] = {
    "25gaussians": _sample_25gaussians, "8gaussians": _sample_8gaussians,
    "pinwheel": _sample_pinwheel, "swissroll": _sample_swissroll,
    "checkerboard": _sample_checkerboard, "2spirals": _sample_2spirals, "rings": _sample_rings,
    "moons": _sample_moons, "circles": _sample_circles, "line": _sample_line, "cos": _sample_cos,
}
assert tuple(_SAMPLERS) == TOY_DATASETS


def _check_name(name: str) -> None:
    """Raise ValueError naming the valid datasets when ``name`` is not one of them."""
    if name not in _SAMPLERS:
        raise ValueError(f"unknown toy dataset {name!r}; valid: {', '.join(TOY_DATASETS)}")


def sample_toy(name: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """A fresh batch [n, 2] (float32, CPU) of toy dataset ``name``; all randomness from
    ``generator``, so the same generator state gives the same batch (method.md §9: infinite data)."""
    _check_name(name)
    return _SAMPLERS[name](int(n), generator).float()


# --- exact modes and true grid masses -------------------------------------------------------

def _mixture_np(name: str) -> tuple[np.ndarray, float] | None:
    """float64 (centres [M, 2], std) of the Gaussian-mixture datasets in final coordinates."""
    if name == "25gaussians":
        return _grid25_centres() / _SCALE_25, _STD_25 / _SCALE_25
    if name == "8gaussians":
        return _ring8_centres() / _SCALE_8, _STD_8 / _SCALE_8
    return None


def toy_modes(name: str) -> tuple[torch.Tensor, float] | None:
    """(mode centres [M, 2] float32, per-mode std) in the scaled coordinates that sample_toy
    returns, for 25gaussians and 8gaussians; None for datasets that are not Gaussian mixtures."""
    _check_name(name)
    mix = _mixture_np(name)
    if mix is None:
        return None
    return torch.from_numpy(mix[0]).float(), float(mix[1])


def _cell_edges(side: np.ndarray) -> np.ndarray:
    """N+1 cell edges: halfway between grid points, outer edges half a spacing beyond the ends."""
    side = np.asarray(side, dtype=np.float64)
    if side.ndim != 1 or side.size < 2:
        raise ValueError("side must be a 1-D array of at least 2 evenly spaced points")
    h = side[1] - side[0]
    return np.concatenate([side - h / 2, [side[-1] + h / 2]])


def _exact_mixture_mass(centres: np.ndarray, std: float, edges: np.ndarray) -> np.ndarray:
    """[N, N] cell masses of an isotropic, equal-weight Gaussian mixture: per mode the cell
    probability factorises into 1-D normal CDF differences along y (rows) and x (columns)."""
    e = torch.from_numpy(edges)
    def cdf(mu):
        return torch.special.ndtr((e[None, :] - torch.from_numpy(mu)[:, None]) / std)
    px = torch.diff(cdf(centres[:, 0]), dim=1)  # [M, N] mass per column
    py = torch.diff(cdf(centres[:, 1]), dim=1)  # [M, N] mass per row
    return (torch.einsum("mi,mj->ij", py, px) / len(centres)).numpy()


def _histogram_cell_mass(
    name: str, side: np.ndarray, n_samples: int, seed: int, chunk: int = 1 << 18
) -> np.ndarray:
    """[N, N] counts-based cell masses from ``n_samples`` seeded draws (chunked to bound memory),
    normalised by n_samples (draws outside the grid are dropped)."""
    edges = _cell_edges(side)
    n, lo, h = len(side), edges[0], edges[1] - edges[0]
    g = torch.Generator().manual_seed(seed)
    counts = np.zeros(n * n, dtype=np.int64)
    for start in range(0, n_samples, chunk):
        x = sample_toy(name, min(chunk, n_samples - start), g).double().numpy()
        col = np.floor((x[:, 0] - lo) / h).astype(np.int64)
        row = np.floor((x[:, 1] - lo) / h).astype(np.int64)
        ok = (col >= 0) & (col < n) & (row >= 0) & (row < n)
        counts += np.bincount(row[ok] * n + col[ok], minlength=n * n)
    return counts.reshape(n, n) / n_samples


def true_cell_mass(
    name: str, side: np.ndarray, *, n_samples: int = 2_000_000, seed: int = 0
) -> np.ndarray:
    """[N, N] probability of each grid cell under the true distribution, cell [i, j] centred at
    (x = side[j], y = side[i]); mass outside the grid is dropped and the array renormalised.
    Exact for the Gaussian mixtures, a seeded ``n_samples``-draw histogram otherwise."""
    _check_name(name)
    mix = _mixture_np(name)
    if mix is not None:
        mass = _exact_mixture_mass(mix[0], mix[1], _cell_edges(side))
    else:
        mass = _histogram_cell_mass(name, side, n_samples, seed)
    total = mass.sum()
    if total <= 0:
        raise ValueError(f"grid [{side[0]}, {side[-1]}] holds none of the mass of {name!r}")
    return mass / total
