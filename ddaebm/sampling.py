"""Sampling from a trained model (method.md §7): the 4-step ancestral sampler, energy refinement, density grids."""

from __future__ import annotations

import contextlib
import copy
from typing import Iterable

import numpy as np
import torch
from torch import nn

from ddaebm.diffusion.schedule import Schedule, posterior_sample


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@contextlib.contextmanager
def bn_mode(module: nn.Module, train: bool):
    """Temporarily put `module` in train or eval mode (BatchNorm batch stats vs running stats)."""
    was = module.training
    module.train(train)
    try:
        yield module
    finally:
        module.train(was)


def batch_norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def precise_bn(generator: nn.Module, inputs: Iterable[tuple[torch.Tensor, ...]]) -> nn.Module:
    """A copy of `generator` whose BatchNorm running statistics are the plain averages of its batch statistics
    over `inputs` (argument tuples of training-like forwards), "precise BN": the running averages training
    leaves weigh its last ~1/momentum batches, a noisy estimate of what eval mode needs. The original is left
    untouched; without BatchNorm, the generator itself (and `inputs` is not drawn from)."""
    norms = batch_norms(generator)
    if not norms:
        return generator
    copied = copy.deepcopy(generator)
    momenta = [m.momentum for m in norms]
    for m in batch_norms(copied):
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: batch i gets weight 1/i, so all end equal
    seen = 0
    with bn_mode(copied, True):
        for args in inputs:
            copied(*args)
            seen += 1
    if seen == 0:
        raise ValueError("precise_bn: no batches to average over")
    for m, momentum in zip(batch_norms(copied), momenta):
        m.momentum = momentum
    return copied


@torch.no_grad()
def denoise(generator: nn.Module, s: Schedule, x: torch.Tensor, from_step: int, nz: int, rng: torch.Generator,
            use_latent: bool = True) -> torch.Tensor:
    """x_0 from x = x_{from_step+1} through the generator steps k = from_step … 0 (method.md §7.1)."""
    n, dev = x.shape[0], x.device  # the noise comes from a CPU generator whatever the device (reproducible)
    for step in reversed(range(from_step + 1)):
        k = torch.full((n,), step, dtype=torch.long, device=dev)
        z = torch.randn((n, nz), generator=rng) if use_latent else torch.zeros(n, nz)
        x = posterior_sample(s, generator(x, k, z.to(dev)), x, k, torch.randn(x.shape, generator=rng).to(dev))
    return x


@torch.no_grad()
def sample(generator: nn.Module, s: Schedule, num: int, data_shape: tuple[int, ...], nz: int,
           rng: torch.Generator, use_latent: bool = True, batch: int = 10_000,
           bn_train: bool = False) -> torch.Tensor:
    """num samples x_0 from x_T ~ N(0, I) through T generator steps (NFE = T, method.md §7.1)."""
    chunks = []
    with bn_mode(generator, bn_train):
        for start in range(0, num, batch):
            n = min(batch, num - start)
            x = torch.randn((n, *data_shape), generator=rng).to(_device(generator))
            chunks.append(denoise(generator, s, x, s.num_steps - 1, nz, rng, use_latent))
    return torch.cat(chunks)


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index`: a function of (seed, index) only, so sample N is the same whatever the batch
    size or the number of ranks (edm2's generate_images idea)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def indexed_noise(seed: int, indices, data_shape: tuple[int, ...], nz: int, num_steps: int,
                  use_latent: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_T [N, *shape], z [N, T, nz], ε [N, T, *shape]) for the samples `indices`, each from its own seed."""
    xs, zs, eps = [], [], []
    for index in indices:
        g = torch.Generator().manual_seed(sample_seed(seed, int(index)))
        xs.append(torch.randn(data_shape, generator=g))
        z = torch.randn((num_steps, nz), generator=g)
        zs.append(z if use_latent else torch.zeros_like(z))
        eps.append(torch.randn((num_steps, *data_shape), generator=g))
    return torch.stack(xs), torch.stack(zs), torch.stack(eps)


@torch.no_grad()
def sample_indexed(generator: nn.Module, s: Schedule, indices, seed: int, data_shape: tuple[int, ...], nz: int,
                   device: torch.device | str = "cpu", use_latent: bool = True) -> torch.Tensor:
    """The samples `indices` (a sequence of ints) from x_T ~ N(0, I) through T generator steps (method.md §7.1).

    Every random number of sample i comes from sample_seed(seed, i): the result does not depend on how the
    indices are batched or split over ranks (up to the floating-point order of batched kernels).
    """
    x, zs, eps = (t.to(device) for t in indexed_noise(seed, indices, data_shape, nz, s.num_steps, use_latent))
    for step in reversed(range(s.num_steps)):
        k = torch.full((x.shape[0],), step, dtype=torch.long, device=device)
        x = posterior_sample(s, generator(x, k, zs[:, step]), x, k, eps[:, step])
    return x


def refine(energy: nn.Module, x: torch.Tensor, step_size: float) -> torch.Tensor:
    """One denoising step x + s·∇_x f_θ(x, 0) on final samples (method.md §7.2; s is a hyperparameter)."""
    x = x.detach().requires_grad_(True)
    k = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    (grad,) = torch.autograd.grad(energy(x, k).sum(), x)
    return (x + step_size * grad).detach()


def grid_side(lo: float, hi: float, n: int) -> np.ndarray:
    return np.linspace(lo, hi, n)


@torch.no_grad()
def energy_grid(energy: nn.Module, side: np.ndarray, k: int = 0, batch: int = 40_000) -> np.ndarray:
    """f_θ(x, k) on the grid side×side: entry [i, j] at (x = side[j], y = side[i]) (method.md §7.3)."""
    xs, ys = np.meshgrid(side, side)
    pts = torch.from_numpy(np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float32)).to(_device(energy))
    out = []
    for start in range(0, len(pts), batch):
        chunk = pts[start:start + batch]
        out.append(energy(chunk, torch.full((len(chunk),), k, dtype=torch.long, device=chunk.device)))
    return torch.cat(out).double().cpu().numpy().reshape(len(side), len(side))


def normalised_density(log_density: np.ndarray) -> np.ndarray:
    """exp(log p − logsumexp) over the grid, summing to 1."""
    shifted = log_density - log_density.max()
    p = np.exp(shifted)
    return p / p.sum()
