"""The 2-D networks of the official toy code (SPEC §2-§4): MLPs with a sinusoidal step embedding.

Energy f_θ(x_k, k) → [B]; generator G_φ(x_{k+1}, k, z) → x₀' ; encoder q_ψ(z | x_k, x_{k+1}, k) → (μ, logvar).
The generator and encoder share one template: an input branch (in → 16 → [BN] → PReLU → 32) and a step
branch (sinusoidal → 16 → PReLU → 32), concatenated (64) and decoded by an MLP.
"""

from __future__ import annotations

import torch
from torch import nn

from ddaebm.networks.embedding import sinusoidal_embedding


def _norm(kind: str, width: int) -> nn.Module:
    return nn.BatchNorm1d(width) if kind == "batch" else nn.Identity()


class StepEmbedding(nn.Module):
    """k ↦ sinusoidal(dim) → dim → PReLU → 32 (the toy t-branch)."""

    def __init__(self, dim: int = 16, out: int = 32):
        super().__init__()
        self.dim = dim
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.PReLU(), nn.Linear(dim, out))

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        return self.net(sinusoidal_embedding(k, self.dim))


class ToyEnergy(nn.Module):
    """f_θ(x, k): x-branch 2 → 16 → PReLU → 32, step branch, then 64 → 300 → 300 → 1; no normalisation."""

    def __init__(self, data_dim: int = 2, hidden: int = 300, t_emb_dim: int = 16):
        super().__init__()
        self.x_branch = nn.Sequential(nn.Linear(data_dim, 16), nn.PReLU(), nn.Linear(16, 32))
        self.t_branch = StepEmbedding(t_emb_dim)
        self.head = nn.Sequential(nn.Linear(64, hidden), nn.PReLU(), nn.Linear(hidden, hidden), nn.PReLU(),
                                  nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.x_branch(x), self.t_branch(k)], dim=1)
        return self.head(h).squeeze(1)


class _ConditionalMLP(nn.Module):
    """The shared G/E template: (input, k) ↦ features of width `out` (SPEC §3, §4)."""

    def __init__(self, in_dim: int, out: int, hidden: int, t_emb_dim: int, norm: str, final_norm: bool):
        super().__init__()
        self.in_branch = nn.Sequential(nn.Linear(in_dim, 16), _norm(norm, 16), nn.PReLU(), nn.Linear(16, 32))
        self.t_branch = StepEmbedding(t_emb_dim)
        layers = [nn.Linear(64, hidden), _norm(norm, hidden), nn.PReLU(),
                  nn.Linear(hidden, hidden), _norm(norm, hidden), nn.PReLU(), nn.Linear(hidden, out)]
        if final_norm:
            layers += [_norm(norm, out), nn.PReLU()]
        self.decoder = nn.Sequential(*layers)

    def forward(self, inputs: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.cat([self.in_branch(inputs), self.t_branch(k)], dim=1))


class ToyGenerator(nn.Module):
    """G_φ(x_{k+1}, k, z) = x₀', the generator's guess of clean data (no output activation)."""

    def __init__(self, data_dim: int = 2, nz: int = 2, hidden: int = 300, t_emb_dim: int = 16, norm: str = "batch"):
        super().__init__()
        self.nz = nz
        self.net = _ConditionalMLP(data_dim + nz, data_dim, hidden, t_emb_dim, norm, final_norm=False)

    def forward(self, x_k1: torch.Tensor, k: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x_k1, z], dim=1), k)


class ToyEncoder(nn.Module):
    """q_ψ(z | x_k, x_{k+1}, k): diagonal Gaussian (μ, logvar), logvar clamped to [logvar_min, logvar_max]."""

    def __init__(self, data_dim: int = 2, nz: int = 2, hidden: int = 300, t_emb_dim: int = 16, norm: str = "batch",
                 logvar_min: float = -10.0, logvar_max: float = 2.0):
        super().__init__()
        self.body = _ConditionalMLP(2 * data_dim, 16, hidden, t_emb_dim, norm, final_norm=True)
        self.mu = nn.Linear(16, nz)
        self.logvar = nn.Linear(16, nz)
        self.logvar_range = (logvar_min, logvar_max)

    def forward(self, x_k: torch.Tensor, x_k1: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(torch.cat([x_k, x_k1], dim=1), k)
        return self.mu(h), self.logvar(h).clamp(*self.logvar_range)
