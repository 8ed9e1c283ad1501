"""Exact likelihood of the NICE_t energy on MNIST (method.md §7.5) and its exact samples.

f_θ(x, k = 0) is a normalised log-density of logit-space data x = logit(clamp(p + (U − ½)/256, 1e-3, 1 − 1e-3)),
p = pixel/255, so the test log-likelihood is exact, no estimate. Reported per image (means over the test split):

- `ll_logit_nats` = mean f(x, 0): the paper's number (−879; MLE NICE −791), in logit space, no logit Jacobian,
  as SSM/VERA report it.
- `bpd_logit` = −ll_logit_nats / (784 ln 2).
- `ll_pixel_nats` = ll_logit_nats + mean Σ_i log|dx_i/dp_i|: the density of the dequantised pixels p' ∈ (0, 1)^784,
  with log|dx/dp| = −log p' − log(1 − p') = softplus(x) + softplus(−x) (the clamp is treated as the identity; it
  only touches pixels within 1e-3 of 0 or 1).
- `bpd_pixel` = (−ll_pixel_nats + 784 ln 256) / (784 ln 2): bits per dimension of the 8-bit images (the uniform
  dequantisation bound, pixels measured in 1/256 bins), the number flows usually quote.

The dequantisation noise is fixed by the seed (iterate_split's counter-based noise), so a rerun gives the same
value. Exact samples: y ~ N(0, I) inverted through NICE at k = 0, then a sigmoid (`exact.png`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def is_nice(energy: torch.nn.Module) -> bool:
    return all(hasattr(energy, a) for a in ("transform", "inverse", "sample"))


def logit_jacobian(x: torch.Tensor) -> torch.Tensor:
    """Σ_i log|dx_i/dp_i| of x = logit(p), per row: Σ softplus(x) + softplus(−x)."""
    return (F.softplus(x) + F.softplus(-x)).sum(dim=1)


@torch.no_grad()
def log_likelihoods(energy: torch.nn.Module, batches, device, num: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(f(x, 0), logit Jacobian) per image, float64, for (images, labels) batches of flat logit data."""
    f_all, jac_all, seen = [], [], 0
    try:
        for x, _ in batches:
            if num is not None and seen >= num:
                break
            x = x[: None if num is None else num - seen].to(device)
            k = torch.zeros(len(x), dtype=torch.long, device=device)
            f_all.append(energy(x, k).double().cpu().numpy())
            jac_all.append(logit_jacobian(x.double()).cpu().numpy())
            seen += len(x)
    finally:
        if hasattr(batches, "close"):
            batches.close()
    return np.concatenate(f_all), np.concatenate(jac_all)


def summarize(f: np.ndarray, jac: np.ndarray, dim: int) -> dict:
    """The four numbers of the module docstring from per-image f(x, 0) and logit Jacobians."""
    if not np.isfinite(f).all():
        raise ValueError("non-finite log-likelihoods (the NICE energy diverged?)")
    ll_logit = float(f.mean())
    ll_pixel = float((f + jac).mean())
    ln2 = math.log(2)
    return {"ll_logit_nats": ll_logit, "bpd_logit": -ll_logit / (dim * ln2), "ll_pixel_nats": ll_pixel,
            "bpd_pixel": (-ll_pixel + dim * math.log(256)) / (dim * ln2),
            "ll_logit_sem": float(f.std(ddof=1) / math.sqrt(len(f))) if len(f) > 1 else 0.0}


@torch.no_grad()
def exact_samples(energy: torch.nn.Module, num: int, seed: int) -> torch.Tensor:
    """num exact samples of exp f(·, 0) in logit space (method.md §7.5); the noise is drawn on the CPU (any device)."""
    device = next(energy.parameters()).device
    y = torch.randn(num, energy.dim, generator=torch.Generator().manual_seed(seed)).to(device)
    return energy.inverse(y, torch.zeros(num, dtype=torch.long, device=device))
