"""The 2-D networks of the official toy code (method.md §2-§4): MLPs with a sinusoidal step embedding.

Energy f_θ(x_k, k) → [B]; generator G_φ(x_{k+1}, k, z) → x₀'; encoder q_ψ(z | x_k, x_{k+1}, k) → (μ, logvar).
All three open the same way: an input branch (in → 16 → [BN] → PReLU → 32) and a step branch
(sinusoidal(16) → 16 → PReLU → 32), concatenated (64) and fed to a Linear(64 → 300) (`BranchedInput`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ddaebm.networks.embedding import sinusoidal_embedding
from ddaebm.networks.layers import PReLU

BRANCH = 16  # width of the input branch's hidden layer
FEATURES = 32  # width of each branch's output


def _norm(kind: str, width: int) -> nn.Module:
    return nn.BatchNorm1d(width) if kind == "batch" else nn.Identity()


class StepEmbedding(nn.Module):
    """k ↦ sinusoidal(dim) → dim → PReLU → 32 (the toy t-branch), for k ∈ {0..num_steps−1}."""

    def __init__(self, dim: int = 16, out: int = FEATURES, num_steps: int = 4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), PReLU(), nn.Linear(dim, out))
        # The sinusoids of every step, fixed: computed once, not per forward.
        self.register_buffer("table", sinusoidal_embedding(torch.arange(num_steps), dim), persistent=False)

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        return self.net(self.table[k])

    def all_steps(self) -> torch.Tensor:
        """The embedding of every k, [num_steps, out]."""
        return self.net(self.table)


class BranchedInput(nn.Module):
    """first(cat(post(pre(x)), step(k))): the opening Linear(64 → hidden) of every toy network.

    `forward` computes it without the concatenation, as the same function in fewer operations: `post` is
    linear, so it folds into `first` (one [B,16]×[16,hidden] product instead of [B,16]×[16,32] then
    [B,64]×[64,hidden]); and the step branch sees only the T values of k, so it runs on those and its share
    of `first` becomes a per-k bias gathered by k. `direct` is the literal form, kept for tests.
    """

    def __init__(self, in_dim: int, hidden: int, t_emb_dim: int, norm: str = "none", num_steps: int = 4):
        super().__init__()
        self.pre = nn.Sequential(nn.Linear(in_dim, BRANCH), _norm(norm, BRANCH), PReLU())
        self.post = nn.Linear(BRANCH, FEATURES)
        self.step = StepEmbedding(t_emb_dim, FEATURES, num_steps)
        self.first = nn.Linear(2 * FEATURES, hidden)

    def forward(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        w_x, w_t = self.first.weight[:, :FEATURES], self.first.weight[:, FEATURES:]
        per_k = F.linear(self.step.all_steps(), w_t, self.first.bias + w_x @ self.post.bias)  # [T, hidden]
        # F.embedding is the gather whose backward is cheapest here (a third of indexing's on this CPU).
        return torch.addmm(F.embedding(k, per_k), self.pre(x), (w_x @ self.post.weight).t())

    def direct(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return self.first(torch.cat([self.post(self.pre(x)), self.step(k)], dim=1))


def base_log_density(x: torch.Tensor, k: torch.Tensor, std: float) -> torch.Tensor:
    """log N(x; 0, std²·I) up to its constant on the rows at k = 0, 0 on the others ([B])."""
    return (k == 0).to(x.dtype) * x.flatten(1).pow(2).sum(1) / (-2 * std * std)


def base_score(x: torch.Tensor, k: torch.Tensor, std: float) -> torch.Tensor:
    """∇_x base_log_density: −x/std² on the rows at k = 0, 0 on the others."""
    return x * ((k == 0).to(x.dtype) / (-std * std)).view(-1, *(1,) * (x.dim() - 1))


class ToyEnergy(nn.Module):
    """f_θ(x, k): x-branch 2 → 16 → PReLU → 32, step branch, then 64 → 300 → 300 → 1; no normalisation.

    base_std > 0 (model.energy_base_std, ddaebm's addition) adds a Gaussian base measure at k = 0:
    f(x, 0) = net(x, 0) + log N(x; 0, base_std²·I). A PReLU network is linear far from the data, where no loss
    term reaches, so exp net(x, 0) can grow there; with the base the density decays like a Gaussian whatever the
    network does (README "Density calibration"). It has no parameters: the losses' gradients are unchanged.
    """

    def __init__(self, data_dim: int = 2, hidden: int = 300, t_emb_dim: int = 16, num_steps: int = 4,
                 base_std: float = 0.0):
        super().__init__()
        self.input = BranchedInput(data_dim, hidden, t_emb_dim, num_steps=num_steps)
        self.head = nn.Sequential(PReLU(), nn.Linear(hidden, hidden), PReLU(), nn.Linear(hidden, 1))
        self.base_std = base_std

    def forward(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        f = self.head(self.input(x, k)).squeeze(1)
        return f + base_log_density(x, k, self.base_std) if self.base_std else f


class _ConditionalMLP(nn.Module):
    """The shared G/E template: (input, k) ↦ features of width `out` (method.md §3, §4)."""

    def __init__(self, in_dim: int, out: int, hidden: int, t_emb_dim: int, norm: str, final_norm: bool,
                 num_steps: int):
        super().__init__()
        self.input = BranchedInput(in_dim, hidden, t_emb_dim, norm, num_steps)
        layers = [_norm(norm, hidden), PReLU(), nn.Linear(hidden, hidden), _norm(norm, hidden), PReLU(),
                  nn.Linear(hidden, out)]
        if final_norm:
            layers += [_norm(norm, out), PReLU()]
        self.decoder = nn.Sequential(*layers)

    def forward(self, inputs: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.input(inputs, k))


class ToyGenerator(nn.Module):
    """G_φ(x_{k+1}, k, z) = x₀', the generator's guess of clean data (no output activation)."""

    def __init__(self, data_dim: int = 2, nz: int = 2, hidden: int = 300, t_emb_dim: int = 16, norm: str = "batch",
                 num_steps: int = 4):
        super().__init__()
        self.nz = nz
        self.net = _ConditionalMLP(data_dim + nz, data_dim, hidden, t_emb_dim, norm, False, num_steps)

    def forward(self, x_k1: torch.Tensor, k: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x_k1, z], dim=1), k)


class ToyEncoder(nn.Module):
    """q_ψ(z | x_k, x_{k+1}, k): diagonal Gaussian (μ, logvar), logvar clamped to [logvar_min, logvar_max]."""

    def __init__(self, data_dim: int = 2, nz: int = 2, hidden: int = 300, t_emb_dim: int = 16, norm: str = "batch",
                 logvar_min: float = -10.0, logvar_max: float = 2.0, num_steps: int = 4):
        super().__init__()
        self.body = _ConditionalMLP(2 * data_dim, 16, hidden, t_emb_dim, norm, True, num_steps)
        self.mu = nn.Linear(16, nz)
        self.logvar = nn.Linear(16, nz)
        self.logvar_range = (logvar_min, logvar_max)

    def forward(self, x_k: torch.Tensor, x_k1: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(torch.cat([x_k, x_k1], dim=1), k)
        return self.mu(h), self.logvar(h).clamp(*self.logvar_range)
