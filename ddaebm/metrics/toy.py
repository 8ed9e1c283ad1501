"""Sample-quality and density metrics for the 2-D toy datasets (``ddaebm eval toy``).

The paper only shows toy figures (method.md §9, §12); these numbers make toy runs comparable.

Definitions
-----------
Mode statistics (``mode_stats``; only for the Gaussian mixtures 25gaussians / 8gaussians,
whose centres and per-mode std σ come from ``ddaebm.data.toy.toy_modes``):
  * each sample is assigned to its nearest mode centre;
  * a sample is *high quality* if its Euclidean distance to that centre is ≤ 3σ;
  * ``frac_within_3sigma`` = fraction of ALL samples that are high quality (for exact samples
    of an isotropic 2-D Gaussian this is the Rayleigh probability 1 − e^{−4.5} ≈ 0.989);
  * a mode is *covered* if it holds ≥ ``min_count`` high-quality samples. The default follows
    VEEGAN's rule (≥ 10 high-quality samples out of 2500) scaled to the sample count N:
    ``min_count = max(1, round(10·N/2500))``; ``modes_covered`` counts covered modes and
    ``modes_total`` is the number of modes.

Sample-vs-data distances (computed on equal numbers of model samples and fresh data draws):
  * ``mmd2``: unbiased squared MMD (diagonal i = j terms excluded from the within-set sums)
    with the kernel k(a, b) = mean_h exp(−‖a − b‖² / (2h²)) over bandwidths h ∈ {0.05, 0.2, 1}
    (the small bandwidths resolve the 0.035-std modes of 25gaussians, the large one the global
    layout). Unbiased ⇒ it can be slightly negative when the two sets match.
  * ``sliced_w1``: mean over random unit directions θ of the 1-D Wasserstein-1 distance between
    the projections ⟨x, θ⟩ and ⟨y, θ⟩ (512 directions; in 2-D they are an evenly spaced set of
    angles over [0, π) with one random offset, which has far less Monte-Carlo error than i.i.d.
    directions; otherwise normalised Gaussians). Exact 1-D W1 of the empirical distributions.

Grid density divergences (``grid_divergences``; need the model's unnormalised log-density on an
N×N grid, e.g. −E or f(x, k = 0), and the grid ``side``):
  * p_model = softmax of the log-density over all grid points (a cell's model mass is taken
    proportional to the density at its centre);
  * p_true = ``true_cell_mass``: the true distribution's probability of each cell, renormalised
    over the grid (exact for the Gaussian mixtures, 2e6-draw histogram otherwise);
  * ``grid_kl`` = KL(p_true ‖ p_model) = Σ_{p_true > 0} p_true (log p_true − log p_model);
  * ``grid_tv`` = ½ Σ |p_true − p_model|.
  Even the exact density scores grid_kl > 0 because point values are compared with cell
  integrals (a cell integral acts like the density blurred by a box of the cell width h, i.e.
  variance σ² + h²/12 per axis). For 25gaussians (σ = 0.1/2.828) on a 200×200 grid over
  [−4, 4]² this floor is 0.0054 ≈ 2·½(r − 1 − ln r), r = 1 + h²/(12σ²); it grows fast on
  coarser grids (0.083 at 100×100). Compare models on the same grid only.
"""

from __future__ import annotations

import numpy as np

from ddaebm.data.toy import toy_modes, true_cell_mass

_BLOCK = 2048  # rows/cols per kernel block: a 2048×2048 float64 block is 32 MiB


def _default_min_count(n: int) -> int:
    """VEEGAN's 10-per-2500 high-quality threshold scaled to n samples (at least 1)."""
    return max(1, int(round(10 * n / 2500)))


def mode_stats(
    samples: np.ndarray, centres: np.ndarray, std: float, *, min_count: int | None = None
) -> dict:
    """{"modes_covered", "modes_total", "frac_within_3sigma"} of ``samples`` [N, D] against
    mode ``centres`` [M, D] with per-mode ``std`` (definitions in the module docstring)."""
    x = np.asarray(samples, dtype=np.float64)
    c = np.asarray(centres, dtype=np.float64)
    d2 = ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)  # [N, M]; M ≤ 25 so this is small
    nearest = d2.argmin(1)
    good = d2[np.arange(len(x)), nearest] <= (3.0 * std) ** 2
    counts = np.bincount(nearest[good], minlength=len(c))
    k = _default_min_count(len(x)) if min_count is None else min_count
    return {
        "modes_covered": int((counts >= k).sum()),
        "modes_total": int(len(c)),
        "frac_within_3sigma": float(good.mean()) if len(x) else 0.0,
    }


def _kernel_block(a: np.ndarray, b: np.ndarray, inv2h2: np.ndarray) -> float:
    """Σ_ij of the multi-bandwidth Gaussian kernel between row blocks a and b."""
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    np.maximum(d2, 0.0, out=d2)  # the expansion can go slightly negative on near-duplicates
    return sum(float(np.exp(-d2 * w).sum()) for w in inv2h2) / len(inv2h2)


def _kernel_sum(a: np.ndarray, b: np.ndarray, inv2h2: np.ndarray) -> float:
    """Σ_ij k(a_i, b_j) over all pairs, block by block to bound memory."""
    return sum(
        _kernel_block(a[i:i + _BLOCK], b[j:j + _BLOCK], inv2h2)
        for i in range(0, len(a), _BLOCK)
        for j in range(0, len(b), _BLOCK)
    )


def mmd2(x: np.ndarray, y: np.ndarray, bandwidths=(0.05, 0.2, 1.0)) -> float:
    """Unbiased squared MMD between samples x [m, D] and y [n, D] (m, n ≥ 2) with the mean of
    Gaussian kernels of the given bandwidths; i = j terms are excluded from the within-set sums."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError("mmd2 needs at least 2 samples in each set")
    inv2h2 = 1.0 / (2.0 * np.asarray(bandwidths, dtype=np.float64) ** 2)
    # k(a, a) = 1 for every bandwidth, so the diagonal of each within-set sum is exactly m (or n).
    kxx = (_kernel_sum(x, x, inv2h2) - m) / (m * (m - 1))
    kyy = (_kernel_sum(y, y, inv2h2) - n) / (n * (n - 1))
    kxy = _kernel_sum(x, y, inv2h2) / (m * n)
    return float(kxx + kyy - 2.0 * kxy)


def _directions(dim: int, n_proj: int, rng: np.random.Generator) -> np.ndarray:
    """[n_proj, dim] unit directions: in 2-D evenly spaced angles on [0, π) with a random offset
    (W1 of a projection is the same for θ and −θ), otherwise normalised Gaussian draws."""
    if dim == 2:
        ang = (np.arange(n_proj) + rng.uniform()) * (np.pi / n_proj)
        return np.stack([np.cos(ang), np.sin(ang)], axis=1)
    v = rng.standard_normal((n_proj, dim))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _w1_sorted(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact 1-D W1 per column between empirical distributions with sorted columns a [m, P] and
    b [n, P]: ∫₀¹ |F_a⁻¹(q) − F_b⁻¹(q)| dq, both quantile functions being piecewise constant on
    the merged breakpoints {i/m} ∪ {j/n}."""
    m, n = len(a), len(b)
    if m == n:
        return np.abs(a - b).mean(0)
    q = np.union1d(np.arange(1, m + 1) / m, np.arange(1, n + 1) / n)
    width = np.diff(q, prepend=0.0)
    mid = q - width / 2  # midpoints avoid rounding trouble exactly at the breakpoints
    ia = np.minimum((mid * m).astype(np.int64), m - 1)
    ib = np.minimum((mid * n).astype(np.int64), n - 1)
    return (width[:, None] * np.abs(a[ia] - b[ib])).sum(0)


def sliced_w1(x: np.ndarray, y: np.ndarray, *, n_proj: int = 512, seed: int = 0) -> float:
    """Sliced Wasserstein-1 between x [m, D] and y [n, D]: mean over ``n_proj`` seeded unit
    directions of the exact W1 between the 1-D projections (sizes may differ)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    dirs = _directions(x.shape[1], n_proj, np.random.default_rng(seed))
    px = np.sort(x @ dirs.T, axis=0)
    py = np.sort(y @ dirs.T, axis=0)
    return float(_w1_sorted(px, py).mean())


def _log_softmax(v: np.ndarray) -> np.ndarray:
    """v − logsumexp(v), stable for very peaked inputs (values like −1e4)."""
    v = np.asarray(v, dtype=np.float64)
    vmax = v.max()
    return v - (vmax + np.log(np.exp(v - vmax).sum()))


def grid_divergences(log_density: np.ndarray, true_mass: np.ndarray) -> dict:
    """{"grid_kl": KL(true ‖ model), "grid_tv": ½Σ|true − model|} where the model's cell masses
    are the softmax of the unnormalised ``log_density`` [N, N] over the whole grid."""
    log_model = _log_softmax(log_density)
    p_model = np.exp(log_model)
    total = p_model.sum()
    p_model /= total
    log_model -= np.log(total)  # keep log p_model consistent with the renormalised p_model
    p_true = np.asarray(true_mass, dtype=np.float64)
    pos = p_true > 0  # 0·log 0 = 0
    kl = float((p_true[pos] * (np.log(p_true[pos]) - log_model[pos])).sum())
    return {"grid_kl": kl, "grid_tv": float(0.5 * np.abs(p_true - p_model).sum())}


def toy_metrics(
    samples: np.ndarray, data: np.ndarray, dataset: str, *,
    log_density: np.ndarray | None = None, side: np.ndarray | None = None, seed: int = 0,
) -> dict:
    """Flat JSON-ready dict of the toy metrics: mode stats (Gaussian mixtures only), mmd2 and
    sliced_w1 of samples vs data on the first min(len) rows of each, and grid_kl / grid_tv when
    ``log_density`` and ``side`` are given (true masses from true_cell_mass(dataset, side, seed))."""
    samples = np.asarray(samples, dtype=np.float64)
    data = np.asarray(data, dtype=np.float64)
    n = min(len(samples), len(data))  # equal counts so both sets carry the same sampling noise
    out: dict = {"n_samples": int(n)}
    modes = toy_modes(dataset)
    if modes is not None:
        out.update(mode_stats(samples, modes[0].double().numpy(), modes[1]))
    out["mmd2"] = mmd2(samples[:n], data[:n])
    out["sliced_w1"] = sliced_w1(samples[:n], data[:n], seed=seed)
    if log_density is not None and side is not None:
        out.update(grid_divergences(log_density, true_cell_mass(dataset, side, seed=seed)))
    return out
