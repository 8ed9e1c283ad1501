"""The layers of the NCSN++ U-Nets (method.md §2, §3, §8): initialisers, norms, self-attention, BigGAN ResBlocks.

Initialisation follows Score-SDE / DDGAN so that a fresh network matches the official one in distribution:
- convs and the step-embedding Linears use DDPM's `default_init`: variance scaling with fan_avg, uniform,
  and a zero bias; "init_scale 0" means a scale of 1e-10 (the last conv of every residual branch);
- DDGAN's `dense` (z mapping, AdaGN styles) reads its "fan_avg" mode as fan_out: U(±√(3/out)).
The U-Net's own output conv is exactly zero instead (see `zero_conv3x3`), so f(x, k) = −½‖x‖² at init.

Every residual sum is divided by √2 (`skip_rescale=True` in every config, method.md §8).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ddaebm.networks.fir import (conv_downsample_2d, downsample_2d, fir_taps, naive_downsample_2d,
                                 naive_upsample_2d, upsample_2d)

RSQRT2 = 1.0 / math.sqrt(2.0)


# --- initialisers -------------------------------------------------------------------------------------------------

def variance_scaling_(weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """DDPM's default_init in place: U(±√(3·scale/fan_avg)), fan_avg = ½(in + out)·receptive field."""
    scale = 1e-10 if scale == 0 else scale
    fan_avg = 0.5 * (weight.shape[0] + weight.shape[1]) * weight[0, 0].numel()
    bound = math.sqrt(3.0 * scale / fan_avg)
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


def conv3x3(in_ch: int, out_ch: int, init_scale: float = 1.0, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=padding)
    variance_scaling_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def zero_conv3x3(in_ch: int, out_ch: int) -> nn.Conv2d:
    """The output conv, exactly zero: the official init_scale 0 gives weights of order 1e-5/√fan, which is not
    quite zero; exact zeros make f(x, k) = −½‖x‖² hold exactly at initialisation (method.md §2)."""
    conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def conv1x1(in_ch: int, out_ch: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, out_ch, 1)
    variance_scaling_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def linear(in_dim: int, out_dim: int) -> nn.Linear:
    """A Linear with DDPM's default_init (step embedding MLP, per-block step projections)."""
    layer = nn.Linear(in_dim, out_dim)
    variance_scaling_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def style_linear(in_dim: int, out_dim: int) -> nn.Linear:
    """A Linear initialised like DDGAN's `dense`: U(±√(3/out_dim)), zero bias (z mapping and AdaGN)."""
    layer = nn.Linear(in_dim, out_dim)
    bound = math.sqrt(3.0 / out_dim)
    nn.init.uniform_(layer.weight, -bound, bound)
    nn.init.zeros_(layer.bias)
    return layer


# --- normalisation ------------------------------------------------------------------------------------------------

def num_groups(channels: int) -> int:
    return min(channels // 4, 32)


class GroupNorm(nn.GroupNorm):
    """Score-SDE's affine GroupNorm (min(C/4, 32) groups, eps 1e-6); ignores `style` so it can stand in for AdaGN."""

    def __init__(self, channels: int):
        super().__init__(num_groups(channels), channels, eps=1e-6)

    def forward(self, x: torch.Tensor, style: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


class AdaptiveGroupNorm(nn.Module):
    """AdaGN (method.md §3): γ(z)·GroupNorm(h) + β(z), GroupNorm without affine; γ's bias starts at 1 and β's at 0."""

    def __init__(self, channels: int, style_dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(num_groups(channels), channels, eps=1e-6, affine=False)
        self.style = style_linear(style_dim, 2 * channels)
        with torch.no_grad():
            self.style.bias[:channels] = 1.0

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.style(style)[:, :, None, None].chunk(2, dim=1)
        return gamma * self.norm(x) + beta


def make_norm(channels: int, style_dim: int | None) -> nn.Module:
    """AdaGN when the network is z-conditioned (the generator), the affine GroupNorm otherwise (the energy)."""
    return GroupNorm(channels) if style_dim is None else AdaptiveGroupNorm(channels, style_dim)


# --- self-attention -----------------------------------------------------------------------------------------------

class NIN(nn.Module):
    """A per-pixel linear map over channels ("network in network"); W is [in, out] as in Score-SDE."""

    def __init__(self, in_ch: int, out_ch: int, init_scale: float = 0.1):
        super().__init__()
        self.W = nn.Parameter(variance_scaling_(torch.empty(in_ch, out_ch), init_scale))
        self.b = nn.Parameter(torch.zeros(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As a 1×1 conv: fast in either memory format.
        return F.conv2d(x, self.W.t()[:, :, None, None], self.b)


class AttnBlock(nn.Module):
    """NCSN++'s single-head self-attention over all H·W positions, residual and rescaled by 1/√2.

    Written with bmm + softmax rather than scaled_dot_product_attention: the fused kernels have no double
    backward, and the R1 penalty differentiates the energy's input gradient (method.md §5).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = GroupNorm(channels)
        self.q = NIN(channels, channels)
        self.k = NIN(channels, channels)
        self.v = NIN(channels, channels)
        self.out = NIN(channels, channels, init_scale=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (proj(y).reshape(b, c, h * w) for proj in (self.q, self.k, self.v))
        weights = torch.softmax(torch.bmm(q.transpose(1, 2), k) * c**-0.5, dim=-1)  # [B, queries, keys]
        attended = torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, h, w)
        return (x + self.out(attended)) * RSQRT2


# --- resampling ---------------------------------------------------------------------------------------------------

class Resample(nn.Module):
    """Parameter-free ×2 up- or down-sampling: the FIR filter, or nearest repeat / 2×2 mean when FIR is off."""

    def __init__(self, up: bool, fir: bool):
        super().__init__()
        self.up, self.fir = up, fir
        if fir:
            self.register_buffer("kernel", fir_taps(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fir:
            return upsample_2d(x, self.kernel) if self.up else downsample_2d(x, self.kernel)
        return naive_upsample_2d(x) if self.up else naive_downsample_2d(x)


class ConvDownsample(nn.Module):
    """A 3×3 conv at stride 2: FIR filter then conv (`fir`), else a 'SAME'-padded strided conv (the input pyramid)."""

    def __init__(self, in_ch: int, out_ch: int, fir: bool):
        super().__init__()
        self.fir = fir
        self.conv = conv3x3(in_ch, out_ch, stride=2, padding=0)
        if fir:
            self.register_buffer("kernel", fir_taps(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fir:
            return conv_downsample_2d(x, self.conv.weight, self.kernel, bias=self.conv.bias)
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # TF 'SAME' for an even input: one pixel after, none before


# --- residual block -----------------------------------------------------------------------------------------------

class ResBlock(nn.Module):
    """BigGAN-type ResBlock of NCSN++ (method.md §8), optionally resampling both paths by 2.

    h = conv₁(dropout(act(norm₁(conv₀(resample(act(norm₀(x)))) + Dense(act(temb)))))), then (skip(x) + h)/√2,
    where skip is a 1×1 conv whenever the width or resolution changes. The norms are AdaGN on z in the
    generator and affine GroupNorms in the energy. `temb` arrives already through the SiLU.
    """

    def __init__(self, in_ch: int, out_ch: int | None = None, *, temb_dim: int, style_dim: int | None = None,
                 up: bool = False, down: bool = False, dropout: float = 0.0, fir: bool = True):
        super().__init__()
        out_ch = out_ch or in_ch
        self.norm0 = make_norm(in_ch, style_dim)
        self.conv0 = conv3x3(in_ch, out_ch)
        self.dense = linear(temb_dim, out_ch)
        self.norm1 = make_norm(out_ch, style_dim)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = conv3x3(out_ch, out_ch, init_scale=0.0)
        self.skip = conv1x1(in_ch, out_ch) if (in_ch != out_ch or up or down) else None
        self.resample = Resample(up, fir) if (up or down) else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor, style: torch.Tensor | None = None) -> torch.Tensor:
        h = F.silu(self.norm0(x, style))
        if self.resample is not None:
            h, x = self.resample(h), self.resample(x)
        h = self.conv0(h) + self.dense(temb)[:, :, None, None]
        h = self.conv1(self.dropout(F.silu(self.norm1(h, style))))
        if self.skip is not None:
            x = self.skip(x)
        return (x + h) * RSQRT2
