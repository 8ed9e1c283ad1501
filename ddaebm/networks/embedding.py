"""Sinusoidal embedding of the integer step index k (method.md §0)."""

from __future__ import annotations

import math

import torch


def sinusoidal_embedding(k: torch.Tensor, dim: int) -> torch.Tensor:
    """[sin, cos] of k at frequencies exp(−i·ln(10⁴)/(h−1)), i = 0..h−1, h = dim/2 ([B, dim])."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32, device=k.device) / (half - 1))
    angles = k.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
