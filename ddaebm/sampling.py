"""Sampling from a trained model (SPEC §7): the 4-step ancestral sampler, energy refinement, density grids."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from ddaebm.diffusion.schedule import Schedule, posterior_sample


@contextlib.contextmanager
def bn_mode(module: nn.Module, train: bool):
    """Temporarily put `module` in train or eval mode (BatchNorm batch stats vs running stats)."""
    was = module.training
    module.train(train)
    try:
        yield module
    finally:
        module.train(was)


@torch.no_grad()
def denoise(generator: nn.Module, s: Schedule, x: torch.Tensor, from_step: int, nz: int, rng: torch.Generator,
            use_latent: bool = True) -> torch.Tensor:
    """x_0 from x = x_{from_step+1} through the generator steps k = from_step … 0 (SPEC §7.1)."""
    n = x.shape[0]
    for step in reversed(range(from_step + 1)):
        k = torch.full((n,), step, dtype=torch.long)
        z = torch.randn((n, nz), generator=rng) if use_latent else torch.zeros(n, nz)
        x = posterior_sample(s, generator(x, k, z), x, k, torch.randn(x.shape, generator=rng))
    return x


@torch.no_grad()
def sample(generator: nn.Module, s: Schedule, num: int, data_shape: tuple[int, ...], nz: int,
           rng: torch.Generator, use_latent: bool = True, batch: int = 10_000,
           bn_train: bool = False) -> torch.Tensor:
    """num samples x_0 from x_T ~ N(0, I) through T generator steps (NFE = T, SPEC §7.1)."""
    chunks = []
    with bn_mode(generator, bn_train):
        for start in range(0, num, batch):
            n = min(batch, num - start)
            x = torch.randn((n, *data_shape), generator=rng)
            chunks.append(denoise(generator, s, x, s.num_steps - 1, nz, rng, use_latent))
    return torch.cat(chunks)


def refine(energy: nn.Module, x: torch.Tensor, step_size: float) -> torch.Tensor:
    """One denoising step x + s·∇_x f_θ(x, 0) on final samples (SPEC §7.2; s is a hyperparameter)."""
    x = x.detach().requires_grad_(True)
    k = torch.zeros(x.shape[0], dtype=torch.long)
    (grad,) = torch.autograd.grad(energy(x, k).sum(), x)
    return (x + step_size * grad).detach()


def grid_side(lo: float, hi: float, n: int) -> np.ndarray:
    return np.linspace(lo, hi, n)


@torch.no_grad()
def energy_grid(energy: nn.Module, side: np.ndarray, k: int = 0, batch: int = 40_000) -> np.ndarray:
    """f_θ(x, k) on the grid side×side: entry [i, j] at (x = side[j], y = side[i]) (SPEC §7.3)."""
    xs, ys = np.meshgrid(side, side)
    pts = torch.from_numpy(np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float32))
    out = []
    for start in range(0, len(pts), batch):
        chunk = pts[start:start + batch]
        out.append(energy(chunk, torch.full((len(chunk),), k, dtype=torch.long)))
    return torch.cat(out).double().numpy().reshape(len(side), len(side))


def normalised_density(log_density: np.ndarray) -> np.ndarray:
    """exp(log p − logsumexp) over the grid, summing to 1."""
    shifted = log_density - log_density.max()
    p = np.exp(shifted)
    return p / p.sum()
