"""The two objectives of one DDAEBM iteration (method.md §5), with every switch of method.md §5-§6.

One iteration draws a `StepBatch` (k, x_k, x_{k+1}, z and the generator's x̃_k, its graph kept) and both
players use it: the energy step on the detached x̃_k, the generator+encoder step through it (method.md §5: the
official code shares one sample between the two steps; DDGAN redraws).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ddaebm.config import LossConfig
from ddaebm.diffusion.schedule import (Schedule, diffuse_pair, importance_weight, log_transition,
                                       posterior_mean, posterior_sample, transition_score)
from ddaebm.networks.precision import full_precision


@dataclass(frozen=True)
class Terms:
    """Which parts of the generator objective are on; the paper's ablations are presets (method.md §6)."""

    latent: bool  # z ~ N(0, I); off: z ≡ 0 in training and sampling
    encoder: bool  # q_ψ exists and is trained
    entropy: bool  # L_lat, the bound on −H(z | x_k, x_{k+1})
    recon: bool  # L_rec, the ELBO's likelihood term (forward KL half)
    kl: bool  # L_KL = KL(q_ψ(z | x_k, x_{k+1}) ‖ N(0, I))


ABLATIONS = {
    "full": Terms(latent=True, encoder=True, entropy=True, recon=True, kl=True),
    # No latent: p_φ is the Gaussian posterior around a deterministic x₀'(x_{k+1}); recon kept with z = 0.
    "no_latent": Terms(latent=False, encoder=False, entropy=False, recon=True, kl=False),
    # Reverse KL only: −E_F + L_lat, the encoder trained by L_lat alone.
    "kl_only": Terms(latent=True, encoder=True, entropy=True, recon=False, kl=False),
    # Reverse KL without the entropy bound (WGAN-0GP inside diffusion): −E_F only, no encoder.
    "kl_no_entropy": Terms(latent=True, encoder=False, entropy=False, recon=False, kl=False),
}


@dataclass
class StepBatch:
    """Everything one iteration draws, shared by the energy and generator steps."""

    k: torch.Tensor  # [B] step index of the target x_k
    x_k: torch.Tensor  # real target, requires grad (for R1)
    x_k1: torch.Tensor  # real noisier input x_{k+1}
    z: torch.Tensor  # prior latent that produced x_fake
    x0_fake: torch.Tensor  # G(x_{k+1}, k, z), graph to φ kept
    x_fake: torch.Tensor  # x̃_k = posterior sample around x0_fake, graph to φ kept
    enc_noise: torch.Tensor  # ε of the encoder's reparameterised z_E
    nce_noise: torch.Tensor | None = None  # per row, N(0, nce_std²·I): the NCE contrast of the rows at k = 0
    # (x_fake, ∂x̃_k/∂x0_fake per row) as draw_step_batch made them: the posterior mean's coefficient at the
    # draw's k, for an objective that runs the generator pass's backward itself (the toy fast path's);
    # it holds only while x_fake is that tensor
    fake_link: tuple[torch.Tensor, torch.Tensor] | None = None


def module_forward(generator: nn.Module, x_k1: torch.Tensor, k: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """G(x_{k+1}, k, z) through the module itself."""
    return generator(x_k1, k, z)


def draw_step_batch(x0: torch.Tensor, s: Schedule, generator: nn.Module, terms: Terms, nz: int,
                    rng: torch.Generator, rank: int = 0, world: int = 1, nce_std: float | None = None,
                    step_probs: list[float] | None = None, forward: Callable = module_forward) -> StepBatch:
    """Draw k, the real pair and the generator's fake x̃_k for one iteration (method.md §1.5, §3, §5).

    x0 is this rank's slice of a global batch of world·len(x0) rows. Every rank draws k and the noises for the
    whole global batch (the same generator state everywhere) and keeps its rows, so a run is the same at any
    world size and resumes exactly on another one. `nce_std`: also draw the NCE noise (loss.nce_weight > 0).
    `step_probs`: how often each k is drawn (loss.step_probs); None: uniform. `forward(generator, x_{k+1}, k, z)`
    runs the generator (Objectives.generator_forward).
    """
    k, x_k, x_k1, z, posterior_noise = draw_generator_inputs(x0, s, terms.latent, nz, rng, rank, world, step_probs)
    n, dev = x0.shape[0], rng.device
    total, rows = n * world, slice(rank * n, (rank + 1) * n)
    enc_noise = torch.randn((total, nz), generator=rng, device=dev)[rows]
    nce = None if nce_std is None else nce_std * torch.randn((total, *x0.shape[1:]), generator=rng, device=dev)[rows]
    x0_fake = forward(generator, x_k1, k, z)
    x_fake = posterior_sample(s, x0_fake, x_k1, k, posterior_noise)
    return StepBatch(k=k, x_k=x_k.requires_grad_(True), x_k1=x_k1, z=z, x0_fake=x0_fake, x_fake=x_fake,
                     enc_noise=enc_noise, nce_noise=nce, fake_link=(x_fake, s.post_c1[k]))


def draw_generator_inputs(x0: torch.Tensor, s: Schedule, latent: bool, nz: int, rng: torch.Generator, rank: int = 0,
                          world: int = 1, step_probs: list[float] | None = None):
    """(k, x_k, x_{k+1}, z, the noise of the posterior sample) of this rank's rows, drawn for the global batch as
    draw_step_batch describes; what the generator's training forward G(x_{k+1}, k, z) reads."""
    n = x0.shape[0]
    total, rows = n * world, slice(rank * n, (rank + 1) * n)
    dev = rng.device  # the training device: the noise is drawn where it is used
    k = draw_steps(total, s.num_steps, rng, step_probs)[rows]
    noise = torch.randn((3, total, *x0.shape[1:]), generator=rng, device=dev)[:, rows]
    z = torch.randn((total, nz), generator=rng, device=dev) if latent else torch.zeros(total, nz, device=dev)
    x_k, x_k1 = diffuse_pair(s, x0, k, noise[0], noise[1])
    return k, x_k, x_k1, z[rows], noise[2]


def device_constant(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A config list as a tensor on `device`, made once per (values, dtype, device): building it every iteration
    would be a host-to-device copy that waits for the GPU (the training loop keeps the GPU free of host syncs)."""
    key = (tuple(values), dtype, torch.device(device))
    if key not in _constants:
        _constants[key] = torch.tensor(key[0], dtype=dtype, device=device)
    return _constants[key]


_constants: dict = {}


def draw_steps(total: int, num_steps: int, rng: torch.Generator, probs: list[float] | None = None) -> torch.Tensor:
    """The step k of each of `total` rows: uniform over 0..num_steps−1, or drawn with the weights `probs`."""
    if probs is None:
        return torch.randint(0, num_steps, (total,), generator=rng, device=rng.device)
    weights = device_constant(probs, torch.float64, rng.device)
    return torch.multinomial(weights, total, replacement=True, generator=rng)


def r1_gammas(cfg: LossConfig, k: torch.Tensor) -> torch.Tensor | float:
    """γ of each row's step k ([B]: loss.r1_gamma times its step's loss.r1_gamma_scale), or the one r1_gamma."""
    if cfg.r1_gamma_scale is None:
        return cfg.r1_gamma
    return cfg.r1_gamma * device_constant(cfg.r1_gamma_scale, torch.float32, k.device)[k]


def r1_enabled(cfg: LossConfig) -> bool:
    return cfg.r1_gamma > 0 and (cfg.r1_gamma_scale is None or max(cfg.r1_gamma_scale) > 0)


def r1_expected_constant(s: Schedule, k: torch.Tensor, dim: int, gamma: torch.Tensor | float) -> torch.Tensor:
    """E of the full-conditional R1 penalty when ∇f ≡ 0: (γ/2)·d·a²/σ² averaged over the batch (method.md §5);
    `gamma` a number or one per row."""
    return 0.5 * dim * (gamma * s.a[k + 1] ** 2 / s.beta[k + 1]).mean()


def r1_penalty(energy: nn.Module, s: Schedule, b: StepBatch, f_real: torch.Tensor, cfg: LossConfig,
               scale: float = 1.0) -> torch.Tensor:
    """(γ/2)·mean‖∇_{x_k}[f(x_k, k) + log N(x_{k+1}; a x_k, σ²)]‖² (method.md §5), differentiable in θ.

    The transition's score a(x_{k+1} − a x_k)/σ² is added in closed form; it has zero mean given x_k and only
    adds the θ-independent constant of `r1_expected_constant` in expectation.
    """
    (grad,) = torch.autograd.grad(f_real.sum(), b.x_k, create_graph=True)
    if cfg.r1_target == "full_conditional":
        grad = grad + transition_score(s, b.x_k.detach(), b.x_k1, b.k)
    gamma = r1_gammas(cfg, b.k)
    if torch.is_tensor(gamma):
        return 0.5 * scale * (gamma * grad.pow(2).flatten(1).sum(1)).mean()
    return 0.5 * gamma * scale * grad.pow(2).flatten(1).sum(1).mean()


def r1_pass_precision(energy: nn.Module, cfg: LossConfig, with_r1: bool):
    """The precision of the pass whose input gradient R1 penalises: fp32 under bf16 autocast when
    loss.r1_precision=fp32 and the penalty is on, else the network's own."""
    if with_r1 and r1_enabled(cfg) and cfg.r1_precision == "fp32":
        return full_precision(energy)
    return contextlib.nullcontext()


def nce_rows(b: StepBatch) -> torch.Tensor:
    """Indices of the rows at k = 0: their real x_k and their noise row are the NCE term's data and noise."""
    if b.nce_noise is None:
        raise ValueError("loss.nce_weight > 0 needs the NCE noise: draw_step_batch(..., nce_std=loss.nce_std)")
    return (b.k == 0).nonzero().squeeze(1)


def nce_log_ratio(f: torch.Tensor, x: torch.Tensor, std: float) -> torch.Tensor:
    """h = f(x, 0) − log N(x; 0, std²·I) up to the noise's constant, which f's level at k = 0 absorbs ([B])."""
    return f + x.flatten(1).pow(2).sum(1) / (2 * std * std)


def nce_value(h_data: torch.Tensor, h_noise: torch.Tensor, rows: int, num_steps: int) -> torch.Tensor:
    """The NCE loss Σ softplus(−h(x₀)) + Σ softplus(h(ε)) over the rows at k = 0, divided by their expected
    number rows/T rather than the number drawn, so that every rank's term adds up to the global batch's.

    Its minimum over f is h = log p_data − log N(0, std²I): f(·, 0) = log p_data + const over the whole space the
    noise covers. The conditional EBM loss at k = 0 compares only points within σ_1 of each other (method.md §1.5), so
    the relative levels of distant modes, and the floor between them, are otherwise left free.
    """
    return (F.softplus(-h_data).sum() + F.softplus(h_noise).sum()) * (num_steps / rows)


def energy_loss(energy: nn.Module, s: Schedule, b: StepBatch, cfg: LossConfig, with_r1: bool = True,
                r1_scale: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_D = mean[−f(x_k) + w_fake·f(sg(x̃_k))] + R1 (method.md §5) [+ λ_nce·NCE]; Gaussian terms cancel in ∂/∂θ.

    Real and fake take separate passes: in one pass of 2B, the R1 double backward would also run over the
    fake half.
    """
    with r1_pass_precision(energy, cfg, with_r1):
        f_real = energy(b.x_k, b.k)
    f_fake = energy(b.x_fake.detach(), b.k)
    loss = -f_real.mean() + cfg.fake_weight * f_fake.mean()
    stats = {"f_real": f_real.mean().detach(), "f_fake": f_fake.mean().detach()}
    if with_r1 and r1_enabled(cfg):
        r1 = r1_penalty(energy, s, b, f_real, cfg, r1_scale)
        loss = loss + r1
        stats["r1"] = r1.detach()
        if cfg.r1_target == "full_conditional":
            constant = r1_expected_constant(s, b.k, b.x_k[0].numel(), r1_gammas(cfg, b.k))
            stats["r1_excess"] = r1.detach() - r1_scale * constant
    if cfg.nce_weight > 0:
        idx = nce_rows(b)
        x_d, x_n = b.x_k.detach()[idx], b.nce_noise[idx]
        nce = nce_value(nce_log_ratio(f_real[idx], x_d, cfg.nce_std),
                        nce_log_ratio(energy(x_n, b.k[idx]), x_n, cfg.nce_std), len(b.k), s.num_steps)
        loss = loss + cfg.nce_weight * nce
        stats["nce"] = nce.detach()
    stats["loss_energy"] = loss.detach()
    return loss, stats


def lazy_r1_loss(energy: nn.Module, s: Schedule, b: StepBatch, cfg: LossConfig) -> tuple[torch.Tensor, dict]:
    """The R1 penalty alone, scaled by its interval (StyleGAN2's lazy regularisation)."""
    with r1_pass_precision(energy, cfg, True):
        f_real = energy(b.x_k, b.k)
    r1 = r1_penalty(energy, s, b, f_real, cfg, scale=float(cfg.r1_interval))
    return r1, {"r1_lazy": r1.detach()}


def _gaussian_nll(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """−log N(x; mean, var·I) summed over data dimensions, with constants ([B]); var is [B]."""
    v = var.view(-1, *([1] * (x.dim() - 1)))
    return 0.5 * (((x - mean) ** 2) / v + torch.log(2 * math.pi * v)).flatten(1).sum(1)


def recon_variance(s: Schedule, k: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """v_k = max(σ̃²_k (floored as in the posterior), floor[, σ̃²_1]) of the recon Gaussian (method.md §5.4)."""
    post_var = torch.exp(s.post_logvar)
    if cfg.recon_var_floor_step1 and s.num_steps > 1:  # a tensor floor: no host read of σ̃²_1
        return post_var[k].clamp(min=post_var[1].clamp(min=cfg.recon_var_floor))
    return post_var[k].clamp(min=cfg.recon_var_floor)


def latent_nll(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Σ_j [½ logvar_j + ½ (z_j − μ_j)²/(1e-6 + e^{logvar_j})], the official L_lat without its weight ([B])."""
    return (0.5 * logvar + 0.5 * (z - mu) ** 2 / (1e-6 + torch.exp(logvar))).sum(1)


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, e^{logvar}) ‖ N(0, I)) per sample ([B])."""
    return -0.5 * (1 + logvar - mu**2 - torch.exp(logvar)).sum(1)


def generator_loss(energy: nn.Module, gen_enc: nn.Module, s: Schedule, b: StepBatch, cfg: LossConfig,
                   terms: Terms) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_G = −E_F + L_lat + L_rec + L_KL (method.md §5), with the terms `terms` switches on."""
    x_k = b.x_k.detach()
    f_fake = energy(b.x_fake, b.k)
    e_f = (f_fake + log_transition(s, b.x_fake, b.x_k1, b.k)).mean()
    loss = -e_f
    stats = {"E_F": e_f.detach()}
    if terms.entropy:
        mu_g, logvar_g = gen_enc.encoder(b.x_fake, b.x_k1, b.k)
        l_lat = cfg.lambda_ent * latent_nll(b.z, mu_g, logvar_g).mean()
        loss, stats["L_lat"] = loss + l_lat, l_lat.detach()
    mu = logvar = None
    if terms.encoder and (terms.recon or terms.kl):
        mu, logvar = gen_enc.encoder(x_k, b.x_k1, b.k)
    if terms.recon:
        l_rec = cfg.lambda_rec * recon_loss(gen_enc, s, b, x_k, mu, logvar, cfg, terms)
        loss, stats["L_rec"] = loss + l_rec, l_rec.detach()
    if terms.kl:
        l_kl = cfg.lambda_kl * kl_to_standard_normal(mu, logvar).mean()
        loss, stats["L_KL"] = loss + l_kl, l_kl.detach()
    stats["loss_gen"] = loss.detach()
    return loss, stats


def recon_loss(gen_enc: nn.Module, s: Schedule, b: StepBatch, x_k: torch.Tensor, mu, logvar, cfg: LossConfig,
               terms: Terms) -> torch.Tensor:
    """The reconstruction term in one of its two forms (method.md §5.4, §5 discrepancy 1)."""
    if cfg.recon_mode == "mse_prior_z":
        # Official CIFAR/CelebA HEAD: MSE to the posterior mean of the prior-z output; encoder unused here.
        mean = posterior_mean(s, b.x0_fake, b.x_k1, b.k)
        return ((x_k - mean) ** 2).flatten(1).sum(1).mean()
    if terms.encoder:
        z_e = mu + torch.exp(0.5 * logvar) * b.enc_noise
        x0_e = gen_enc.generator(b.x_k1, b.k, z_e)
    else:  # no-latent ablation: G(x_{k+1}, k, 0) is the D step's output already
        x0_e = b.x0_fake
    mean = posterior_mean(s, x0_e, b.x_k1, b.k)
    nll = _gaussian_nll(x_k, mean, recon_variance(s, b.k, cfg))
    w = importance_weight(s.t[b.k + 1], cfg.iw_alpha, cfg.iw_beta)
    return (w * nll).mean()


@dataclass(frozen=True)
class Objectives:
    """The functions one training iteration calls: how the StepBatch's fake is drawn, and the three losses.

    GENERIC below is the definition (plain autograd, any network); ddaebm/fastpath offers the same functions
    for the toy MLPs, and the trainer picks one set once, before training (train.fast_path)."""

    name: str
    generator_forward: Callable = module_forward
    energy_loss: Callable = energy_loss
    lazy_r1_loss: Callable = lazy_r1_loss
    generator_loss: Callable = generator_loss


GENERIC = Objectives("generic")
