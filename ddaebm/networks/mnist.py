"""MNIST networks (method.md §7.5): the NICE_t energy, the MLP generator and encoder, and the logit preprocessing.

NICE_t is an exact, normalised density for every step k, so f(x, k) is a log-likelihood and samples are exact.
Choices the SPEC leaves open, and why:
- m-network depth: "5 hidden layers of 1000 units" read literally, 392 → 1000 being the first of the five
  (VERA's and SSM's `num_layers=5` have four hidden activations; the NICE paper and the DDAEBM text say five).
- The scale layer is **per k** (s ∈ R^{T×784}). Additive couplings preserve volume, so the scale layer alone
  sets the model's differential entropy, H = H(N(0, I)) − Σs. A scale shared over k would force the same
  entropy on every q(x_k), whose noise level (hence entropy) grows with k (method.md §4b: exp f(·, k) ∝ q(x_k)).
  s starts at 0; the cost is 3·784 extra parameters.
- The last linear layer of every m-network starts at zero, so the flow starts as the identity and
  f(x, k) = log N(x; 0, I) for every k (as in Glow); its gradient is non-zero from the first step.
- G and E: their step branch is sinusoidal(50) → FC 50 → PReLU → FC 100, by analogy with the toy networks
  (sinusoidal(16) → 16 → PReLU → 32). The concatenation is followed, as in the toy template, by a Linear
  from the concatenation and PReLU-separated hidden layers: G's decoder 1700 → 1600 → 1600 → 784,
  E's 1700 → 1600 → (μ, logvar). No normalisation layers and no output activation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ddaebm.networks.embedding import sinusoidal_embedding
from ddaebm.networks.layers import PReLU

DEQUANT = 1 / 256  # width of the uniform dequantisation noise (±1/512)
LOGIT_EPS = 1e-3  # pixels are clamped to [eps, 1 − eps] before the logit


def logit_transform(pixels01: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, …] pixels in [0, 1] → [B, D] logit-space data (VERA's `--logit` path, method.md §7.5).

    Uniform dequantisation (U − ½)/256, clamp to [1e-3, 1 − 1e-3], logit, flatten.
    """
    noise = torch.rand(pixels01.shape, generator=generator, device=pixels01.device, dtype=pixels01.dtype)
    p = (pixels01 + (noise - 0.5) * DEQUANT).clamp(LOGIT_EPS, 1 - LOGIT_EPS)
    return torch.logit(p).flatten(1)


def from_logit(x: torch.Tensor) -> torch.Tensor:
    """Logit-space data → pixels in (0, 1): the sigmoid (shape kept)."""
    return torch.sigmoid(x)


def _step_table(dim: int, num_steps: int) -> torch.Tensor:
    return sinusoidal_embedding(torch.arange(num_steps), dim)


# ------------------------------------------------------------------------------------------------- NICE_t


class CouplingNet(nn.Module):
    """m(h, k): h_l = PReLU(W_l h_{l−1}) + PReLU(V_l e(k)) for l = 1..num_hidden, then a zero-initialised Linear."""

    def __init__(self, half: int, hidden: int, num_hidden: int, e_dim: int):
        super().__init__()
        self.w = nn.ModuleList([nn.Linear(half if i == 0 else hidden, hidden) for i in range(num_hidden)])
        self.v = nn.ModuleList([nn.Linear(e_dim, hidden) for _ in range(num_hidden)])
        self.act_w = nn.ModuleList([PReLU() for _ in range(num_hidden)])
        self.act_v = nn.ModuleList([PReLU() for _ in range(num_hidden)])
        self.out = nn.Linear(hidden, half)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, h: torch.Tensor, k: torch.Tensor, e_all: torch.Tensor) -> torch.Tensor:
        for w, v, act_w, act_v in zip(self.w, self.v, self.act_w, self.act_v):
            # The step term takes only T values: compute it on e(0..T−1) and gather by k.
            h = act_w(w(h)) + F.embedding(k, act_v(v(e_all)))
        return self.out(h)


class NICEEnergy(nn.Module):
    """NICE_t: f(x, k) = log N(y; 0, I) + Σ s_k, y = e^{s_k} ⊙ couplings(permute(x), k) (method.md §7.5).

    An exact normalised log-density of x ∈ R^dim for every k ∈ {0..num_steps−1}. The permutation puts the
    even coordinates first; coupling i adds m_i(first half) to the second half for even i and m_i(second
    half) to the first half for odd i. e(k) = Linear(sinusoidal(t_emb_dim)).
    """

    def __init__(self, dim: int = 784, hidden: int = 1000, num_hidden: int = 5, num_couplings: int = 4,
                 num_steps: int = 4, t_emb_dim: int = 64):
        super().__init__()
        if dim % 2:
            raise ValueError(f"NICE needs an even dim, got {dim}")
        self.dim = dim
        perm = torch.cat([torch.arange(0, dim, 2), torch.arange(1, dim, 2)])
        self.register_buffer("perm", perm, persistent=False)
        self.register_buffer("inv_perm", torch.argsort(perm), persistent=False)
        self.register_buffer("table", _step_table(t_emb_dim, num_steps), persistent=False)
        self.step = nn.Linear(t_emb_dim, t_emb_dim)
        self.couplings = nn.ModuleList([CouplingNet(dim // 2, hidden, num_hidden, t_emb_dim)
                                        for _ in range(num_couplings)])
        self.log_scale = nn.Parameter(torch.zeros(num_steps, dim))

    def transform(self, x: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, log|det ∂y/∂x|) for x [B, dim], k [B]; the log-det is Σ s_k ([B])."""
        e_all = self.step(self.table)
        h = x[:, self.perm]
        for i, m in enumerate(self.couplings):
            a, b = h.chunk(2, dim=1)
            h = torch.cat([a, b + m(a, k, e_all)] if i % 2 == 0 else [a + m(b, k, e_all), b], dim=1)
        s = self.log_scale[k]
        return h * s.exp(), s.sum(dim=1)

    def inverse(self, y: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """x with transform(x, k)[0] = y."""
        e_all = self.step(self.table)
        h = y * (-self.log_scale[k]).exp()
        for i in reversed(range(len(self.couplings))):
            m = self.couplings[i]
            a, b = h.chunk(2, dim=1)
            h = torch.cat([a, b - m(a, k, e_all)] if i % 2 == 0 else [a - m(b, k, e_all), b], dim=1)
        return h[:, self.inv_perm]

    def forward(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """log p_k(x) in nats, [B]."""
        y, log_det = self.transform(x, k)
        return -0.5 * (y.pow(2).sum(dim=1) + self.dim * math.log(2 * math.pi)) + log_det

    def log_density(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return self(x, k)

    def sample(self, n: int, k: int | torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """n exact samples of p_k ([n, dim]), by inverting N(0, I) draws; differentiable in the parameters."""
        device = self.log_scale.device
        if not torch.is_tensor(k):
            k = torch.full((n,), int(k), dtype=torch.long, device=device)
        # Drawn on the generator's device (a CPU generator gives the same samples on any device), then moved.
        y = torch.randn(n, self.dim, generator=generator, device=generator.device if generator else device)
        return self.inverse(y.to(device), k)


# ------------------------------------------------------------------------------------ MLP generator / encoder


class BranchedMLP(nn.Module):
    """(input, k) ↦ decoder(cat(x-branch(input), step-branch(k))): the toy template at MNIST widths (method.md §7.5).

    x-branch: in → branch[0] → PReLU → branch[1]; step branch: sinusoidal(t_emb_dim) → step[0] → PReLU → step[1];
    decoder: Linear(branch[1] + step[1] → widths[0]), then [PReLU, Linear] to each next width and to `out`.
    """

    def __init__(self, in_dim: int, out: int, branch: tuple[int, int], widths: tuple[int, ...],
                 step: tuple[int, int] = (50, 100), t_emb_dim: int = 50, num_steps: int = 4):
        super().__init__()
        self.x_branch = nn.Sequential(nn.Linear(in_dim, branch[0]), PReLU(), nn.Linear(branch[0], branch[1]))
        self.step_branch = nn.Sequential(nn.Linear(t_emb_dim, step[0]), PReLU(), nn.Linear(step[0], step[1]))
        self.register_buffer("table", _step_table(t_emb_dim, num_steps), persistent=False)
        sizes = [branch[1] + step[1], *widths]
        layers: list[nn.Module] = [nn.Linear(sizes[0], sizes[1])]
        for n_in, n_out in zip(sizes[1:], [*sizes[2:], out]):
            layers += [PReLU(), nn.Linear(n_in, n_out)]
        self.decoder = nn.Sequential(*layers)

    def forward(self, inputs: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        t = F.embedding(k, self.step_branch(self.table))  # T distinct values: run the branch on those only
        return self.decoder(torch.cat([self.x_branch(inputs), t], dim=1))


class MLPGenerator(nn.Module):
    """G_φ(x_{k+1}, k, z) = x₀' in logit space (no output activation; method.md §3, §7.5).

    `skip` (one gain per step) adds g_k·x_{k+1} to the output, the gains learned from these values: a plain MLP,
    narrower than its 784-wide input, learns to pass x_{k+1} through at the pace Adam's step size allows, and until
    then its x₀ misses by several times what x_{k+1}/√ᾱ_{k+1} would (method.md §7.5; measured: it does not stop
    the generator's collapse onto one digit, which the noisiest step makes)."""

    def __init__(self, dim: int = 784, nz: int = 50, num_steps: int = 4, branch: tuple[int, int] = (1600, 1600),
                 widths: tuple[int, ...] = (1600, 1600), t_emb_dim: int = 50, skip: Sequence[float] | None = None):
        super().__init__()
        self.nz = nz
        self.net = BranchedMLP(dim + nz, dim, branch, widths, t_emb_dim=t_emb_dim, num_steps=num_steps)
        self.gain = None if skip is None else nn.Parameter(torch.as_tensor(skip, dtype=torch.float32).clone())

    def forward(self, x_k1: torch.Tensor, k: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        out = self.net(torch.cat([x_k1, z], dim=1), k)
        return out if self.gain is None else out + self.gain[k].unsqueeze(1) * x_k1


class MLPEncoder(nn.Module):
    """q_ψ(z | x_k, x_{k+1}, k) = N(μ, diag e^logvar), logvar clamped to [logvar_min, logvar_max] (method.md §4,§11)."""

    def __init__(self, dim: int = 784, nz: int = 50, num_steps: int = 4, logvar_min: float = -10.0,
                 logvar_max: float = 2.0, branch: tuple[int, int] = (3200, 1600), widths: tuple[int, ...] = (1600,),
                 t_emb_dim: int = 50):
        super().__init__()
        self.nz = nz
        self.logvar_range = (logvar_min, logvar_max)
        # One Linear to 2·nz: the μ and logvar heads side by side.
        self.net = BranchedMLP(2 * dim, 2 * nz, branch, widths, t_emb_dim=t_emb_dim, num_steps=num_steps)

    def forward(self, x_k: torch.Tensor, x_k1: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.net(torch.cat([x_k, x_k1], dim=1), k).chunk(2, dim=1)
        return mu, logvar.clamp(*self.logvar_range)
