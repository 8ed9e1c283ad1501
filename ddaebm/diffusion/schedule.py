"""The discretised forward process and its Gaussian posterior (method.md §1).

Step index k ∈ {0..T−1} names the pair (x_k, x_{k+1}); every network is conditioned on k, the index of the
target x_k (method.md §0). Tensors are indexed by j ∈ {0..T} (ᾱ, β, σ, a) or by k ∈ {0..T−1} (posterior).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ddaebm.config import DiffusionConfig

DDGAN_FIRST_BETA = 1e-8


def time_grid(num_steps: int, kind: str, eps: float) -> torch.Tensor:
    """t_0..t_T in float64: 'eps' is the equidistant grid from ε to 1, 'drl' the LSUN grid (method.md §1.1-1.2)."""
    j = torch.arange(num_steps + 1, dtype=torch.float64)
    if kind == "eps":
        return eps + (1.0 - eps) * j / num_steps
    if kind == "drl":
        # The first T−1 steps cover only the first half of SDE time; the last jumps to t = 1.
        stride = 1000 // (2 * (num_steps - 1)) if num_steps > 1 else 999
        t = j * stride / 999.0
        t[-1] = 1.0
        return t
    raise ValueError(f"unknown time grid {kind!r}")


def marginal_variance(t: torch.Tensor, beta_min: float, beta_max: float, kind: str = "vp") -> torch.Tensor:
    """var(t) of the VP-SDE marginal (method.md §1.3), or the geometric alternative."""
    if kind == "vp":
        return 1.0 - torch.exp(-0.5 * t**2 * (beta_max - beta_min) - t * beta_min)
    if kind == "geometric":
        return beta_min * (beta_max / beta_min) ** t
    raise ValueError(f"unknown variance kind {kind!r}")


def importance_weight(t: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """w(t) = α·t^{log(β/α)/log 0.5}: w(1) = α, w(0.5) = β; (1, 1) gives w ≡ 1 (method.md §4b, §5.4)."""
    return alpha * t ** (math.log(beta / alpha) / math.log(0.5))


@dataclass(frozen=True)
class Schedule:
    """All per-step coefficients of one diffusion setting, as float32 tensors on one device."""

    t: torch.Tensor  # [T+1] time of x_j
    alpha_bar: torch.Tensor  # [T+1] ᾱ_j = ∏_{i≤j}(1 − β_i)
    beta: torch.Tensor  # [T+1]
    sigma: torch.Tensor  # [T+1] σ_j = √β_j
    a: torch.Tensor  # [T+1] a_j = √(1 − β_j)
    post_c1: torch.Tensor  # [T] coefficient of x₀ in the posterior mean
    post_c2: torch.Tensor  # [T] coefficient of x_{k+1}
    post_var: torch.Tensor  # [T] σ̃²_k (exact, may be 0 on the DRL grid)
    post_logvar: torch.Tensor  # [T] log max(σ̃²_k, floor); -inf at σ̃² = 0 without a floor

    @property
    def num_steps(self) -> int:
        return self.post_c1.shape[0]

    def to(self, device: torch.device | str) -> "Schedule":
        return Schedule(**{name: getattr(self, name).to(device) for name in self.__dataclass_fields__})


def build_schedule(cfg: DiffusionConfig) -> Schedule:
    """The schedule of method.md §1.4-1.6, computed in float64 and stored in float32."""
    t = time_grid(cfg.num_steps, cfg.grid, cfg.eps)
    if cfg.variance == "explicit":
        var = torch.tensor(cfg.variances, dtype=torch.float64)
    else:
        var = marginal_variance(t, cfg.beta_min, cfg.beta_max, cfg.variance)
    alpha_bar_raw = 1.0 - var
    beta = torch.empty_like(t)
    beta[0] = var[0] if cfg.first_beta == "var_t0" else DDGAN_FIRST_BETA
    beta[1:] = 1.0 - alpha_bar_raw[1:] / alpha_bar_raw[:-1]
    if cfg.clamp_beta is not None:
        beta = beta.clamp(max=cfg.clamp_beta)
    # Recomputed from β so that ∏(1−β) = ᾱ holds exactly, also after the clamp (method.md §1.4).
    alpha_bar = torch.cumprod(1.0 - beta, dim=0)
    ab_k, ab_k1, beta_k1 = alpha_bar[:-1], alpha_bar[1:], beta[1:]
    post_c1 = beta_k1 * ab_k.sqrt() / (1.0 - ab_k1)
    post_c2 = (1.0 - ab_k) * (1.0 - beta_k1).sqrt() / (1.0 - ab_k1)
    post_var = beta_k1 * (1.0 - ab_k) / (1.0 - ab_k1)
    post_logvar = torch.log(post_var.clamp(min=cfg.posterior_logvar_floor))
    f32 = lambda x: x.to(torch.float32)  # noqa: E731
    return Schedule(t=f32(t), alpha_bar=f32(alpha_bar), beta=f32(beta), sigma=f32(beta.sqrt()),
                    a=f32((1.0 - beta).sqrt()), post_c1=f32(post_c1), post_c2=f32(post_c2),
                    post_var=f32(post_var), post_logvar=f32(post_logvar))


def _per_sample(coef: torch.Tensor, k: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """coef[k] shaped to broadcast against a batch like `like`."""
    return coef[k].view(-1, *([1] * (like.dim() - 1)))


def diffuse_pair(s: Schedule, x0: torch.Tensor, k: torch.Tensor, noise1: torch.Tensor,
                 noise2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_k, x_{k+1}) for training (method.md §1.5): x_k from q(x_k | x₀), then one forward step."""
    x_k = _per_sample(s.alpha_bar.sqrt(), k, x0) * x0 + _per_sample((1.0 - s.alpha_bar).sqrt(), k, x0) * noise1
    x_k1 = _per_sample(s.a, k + 1, x0) * x_k + _per_sample(s.sigma, k + 1, x0) * noise2
    return x_k, x_k1


def posterior_mean(s: Schedule, x0: torch.Tensor, x_k1: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """μ̃_k(x₀, x_{k+1}) of q(x_k | x_{k+1}, x₀) (method.md §1.6)."""
    return _per_sample(s.post_c1, k, x0) * x0 + _per_sample(s.post_c2, k, x0) * x_k1


def posterior_sample(s: Schedule, x0: torch.Tensor, x_k1: torch.Tensor, k: torch.Tensor,
                     noise: torch.Tensor) -> torch.Tensor:
    """The generator's x_k: μ̃_k plus σ̃_k·ε for k > 0, the mean alone at k = 0 (method.md §3)."""
    std = torch.where(k > 0, torch.exp(0.5 * s.post_logvar[k]), torch.zeros_like(s.post_logvar[k]))
    return posterior_mean(s, x0, x_k1, k) + std.view(-1, *([1] * (x0.dim() - 1))) * noise


def log_transition(s: Schedule, x_k: torch.Tensor, x_k1: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """log N(x_{k+1}; a_{k+1}·x_k, σ²_{k+1}·I), summed over data dimensions, with its constants ([B])."""
    a = _per_sample(s.a, k + 1, x_k)
    var = _per_sample(s.beta, k + 1, x_k)
    d = x_k[0].numel()
    sq = ((x_k1 - a * x_k) ** 2 / var).flatten(1).sum(1)
    return -0.5 * sq - 0.5 * d * torch.log(2 * math.pi * s.beta[k + 1])


def transition_score(s: Schedule, x_k: torch.Tensor, x_k1: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """∇_{x_k} log N(x_{k+1}; a·x_k, σ²I) = a(x_{k+1} − a·x_k)/σ², in closed form (x_{k+1} held fixed)."""
    a = _per_sample(s.a, k + 1, x_k)
    return a * (x_k1 - a * x_k) / _per_sample(s.beta, k + 1, x_k)
