"""The image networks: Score-SDE's NCSN++ U-Net as the energy f_θ and, z-conditioned as in DDGAN, the generator G_φ.

One skeleton serves both (method.md §8): a 3×3 input conv; per resolution `num_res_blocks` BigGAN ResBlocks (with
self-attention at `attn_resolutions`), then a down-sampling ResBlock and, with progressive_input='residual',
the input image FIR-downsampled alongside and added in; a middle ResBlock-attention-ResBlock; the mirror-image
up path with `num_res_blocks + 1` ResBlocks per resolution fed by the skips; GroupNorm, SiLU and a zero 3×3 conv.
The step index k enters every ResBlock through a sinusoidal(nf) → nf·4 → SiLU → nf·4 embedding.

- `NCSNppEnergy` (method.md §2): affine GroupNorms; f(x, k) = −½·Σ (x − U(x, k))², exactly −½‖x‖² at init.
- `NCSNppGenerator` (method.md §3): every ResBlock norm is AdaGN on a mapped z; tanh output; sees x_{k+1} only.
"DDPM++" (LSUN) is the same with fir=False, progressive_input='none' and dropout 0.

Modules are registered in the official order, so a checkpoint of the official networks maps onto these
parameter by parameter (same shapes in the same order).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ddaebm.networks.embedding import sinusoidal_embedding
from ddaebm.networks.ncsnpp_blocks import (RSQRT2, AttnBlock, ConvDownsample, GroupNorm, ResBlock, conv3x3, linear,
                                           style_linear, zero_conv3x3)


class ResAttn(nn.Module):
    """A ResBlock followed, at the attention resolutions, by self-attention (one step of the down path)."""

    def __init__(self, block: ResBlock, attn: AttnBlock | None):
        super().__init__()
        self.block, self.attn = block, attn

    def forward(self, h: torch.Tensor, temb: torch.Tensor, style: torch.Tensor | None) -> torch.Tensor:
        h = self.block(h, temb, style)
        return h if self.attn is None else self.attn(h)


class DownLevel(nn.Module):
    """One resolution of the encoder path: its ResBlocks, then (except at the last) a ×½ ResBlock and the pyramid."""

    def __init__(self, blocks: list[ResAttn], down: ResBlock | None, pyramid: ConvDownsample | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.down, self.pyramid = down, pyramid

    def forward(self, h, pyramid, temb, style) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The skip activations this level leaves for the decoder, and the updated input pyramid."""
        skips = []
        for block in self.blocks:
            h = block(h, temb, style)
            skips.append(h)
        if self.down is not None:
            h = self.down(h, temb, style)
            if self.pyramid is not None:
                # progressive_input='residual': the image, downsampled by a FIR conv, joins the features.
                pyramid = (self.pyramid(pyramid) + h) * RSQRT2
                h = pyramid
            skips.append(h)
        return skips, pyramid


class UpLevel(nn.Module):
    """One resolution of the decoder path: ResBlocks on [h, skip], attention, then (except at the top) a ×2 ResBlock."""

    def __init__(self, blocks: list[ResBlock], attn: AttnBlock | None, up: ResBlock | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attn, self.up = attn, up

    def forward(self, h, skips: list[torch.Tensor], temb, style) -> torch.Tensor:
        """The level's output; pops the skips it uses off the end of `skips` (the encoder's, in order)."""
        for block in self.blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), temb, style)
        if self.attn is not None:
            h = self.attn(h)
        return h if self.up is None else self.up(h, temb, style)


class NCSNppUNet(nn.Module):
    """U(x, k[, style]) → [B, channels, H, W]: the NCSN++ skeleton shared by the energy and the generator.

    `style_dim` None gives affine GroupNorms everywhere (the energy); an int makes every ResBlock norm AdaGN
    on a style vector of that width (the generator). Attention and the output norm stay plain GroupNorms.
    """

    def __init__(self, image_size: int, channels: int, nf: int, ch_mult: Sequence[int], num_res_blocks: int,
                 attn_resolutions: Sequence[int], dropout: float, fir: bool, progressive_input: str, num_steps: int,
                 style_dim: int | None = None):
        super().__init__()
        if progressive_input not in ("residual", "none"):
            raise ValueError(f"progressive_input must be 'residual' or 'none', not {progressive_input!r}")
        if image_size % 2 ** (len(ch_mult) - 1):
            raise ValueError(f"image_size {image_size} is not divisible by 2^{len(ch_mult) - 1}")
        self.nf = nf
        # The sinusoids of every step, fixed (method.md §0): computed once, gathered by k.
        self.register_buffer("step_table", sinusoidal_embedding(torch.arange(num_steps), nf), persistent=False)
        self.temb = nn.Sequential(linear(nf, 4 * nf), nn.SiLU(), linear(4 * nf, 4 * nf))
        res_block = _res_block_factory(4 * nf, style_dim, dropout, fir)
        self.conv_in = conv3x3(channels, nf)
        self.down, skip_channels = _down_path(res_block, channels, nf, ch_mult, num_res_blocks, attn_resolutions,
                                              image_size, fir, progressive_input == "residual")
        width = skip_channels[-1]
        self.mid = nn.ModuleList([res_block(width), AttnBlock(width), res_block(width)])
        self.up, width = _up_path(res_block, nf, ch_mult, num_res_blocks, attn_resolutions, image_size, skip_channels)
        self.norm_out = GroupNorm(width)
        self.conv_out = zero_conv3x3(width, channels)

    def step_embedding(self, k: torch.Tensor) -> torch.Tensor:
        """SiLU(MLP(sinusoidal(k))), [B, 4·nf]: the SiLU every ResBlock applies before its Dense, done once."""
        return F.silu(self.temb(self.step_table[k]))

    def forward(self, x: torch.Tensor, k: torch.Tensor, style: torch.Tensor | None = None) -> torch.Tensor:
        temb = self.step_embedding(k)
        skips, pyramid = [self.conv_in(x)], x
        for level in self.down:
            level_skips, pyramid = level(skips[-1], pyramid, temb, style)
            skips += level_skips
        h = self.mid[0](skips[-1], temb, style)
        h = self.mid[2](self.mid[1](h), temb, style)
        for level in self.up:
            h = level(h, skips, temb, style)
        return self.conv_out(F.silu(self.norm_out(h)))


def _res_block_factory(temb_dim: int, style_dim: int | None, dropout: float, fir: bool):
    def res_block(in_ch: int, out_ch: int | None = None, up: bool = False, down: bool = False) -> ResBlock:
        return ResBlock(in_ch, out_ch, temb_dim=temb_dim, style_dim=style_dim, up=up, down=down, dropout=dropout,
                        fir=fir)
    return res_block


def _down_path(res_block, channels, nf, ch_mult, num_res_blocks, attn_resolutions, image_size, fir, pyramid):
    """The encoder levels and the channel count of every skip activation they leave (conv_in's first)."""
    levels, skip_channels, width, pyramid_width = [], [nf], nf, channels
    for i, mult in enumerate(ch_mult):
        with_attn = (image_size >> i) in attn_resolutions
        blocks = []
        for _ in range(num_res_blocks):
            blocks.append(ResAttn(res_block(width, nf * mult), AttnBlock(nf * mult) if with_attn else None))
            width = nf * mult
            skip_channels.append(width)
        down = pyramid_conv = None
        if i < len(ch_mult) - 1:
            down = res_block(width, down=True)
            if pyramid:
                pyramid_conv, pyramid_width = ConvDownsample(pyramid_width, width, fir), width
            skip_channels.append(width)
        levels.append(DownLevel(blocks, down, pyramid_conv))
    return nn.ModuleList(levels), skip_channels


def _up_path(res_block, nf, ch_mult, num_res_blocks, attn_resolutions, image_size, skip_channels):
    """The decoder levels, coarsest first, consuming `skip_channels` from the end; and their output width."""
    skip_channels = list(skip_channels)
    levels, width = [], skip_channels[-1]
    for i in reversed(range(len(ch_mult))):
        blocks = []
        for _ in range(num_res_blocks + 1):
            blocks.append(res_block(width + skip_channels.pop(), nf * ch_mult[i]))
            width = nf * ch_mult[i]
        attn = AttnBlock(width) if (image_size >> i) in attn_resolutions else None
        levels.append(UpLevel(blocks, attn, res_block(width, up=True) if i > 0 else None))
    assert not skip_channels
    return nn.ModuleList(levels), width


class NCSNppEnergy(nn.Module):
    """f_θ(x_k, k) = −½·Σ_pixels (x_k − U(x_k, k))² → [B] (method.md §2), always in float32.

    No sigma scaling and no tanh. The output conv of U is zero, so f(x, k) = −½‖x‖² at initialisation.
    """

    def __init__(self, image_size: int = 32, channels: int = 3, nf: int = 128, ch_mult: Sequence[int] = (1, 2, 2, 2),
                 num_res_blocks: int = 2, attn_resolutions: Sequence[int] = (16,), dropout: float = 0.1,
                 fir: bool = True, progressive_input: str = "residual", num_steps: int = 4):
        super().__init__()
        self.unet = NCSNppUNet(image_size, channels, nf, ch_mult, num_res_blocks, attn_resolutions, dropout, fir,
                               progressive_input, num_steps)

    def unet_output(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """U(x, k), [B, C, H, W], in the compute dtype (bf16 under autocast)."""
        return self.unet(x, k)

    def forward(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        # float32 before the subtraction: under bf16 autocast U is bf16, and x − U would lose the small residual.
        residual = x.float() - self.unet(x, k).float()
        return -0.5 * residual.square().sum(dim=(1, 2, 3))


class PixelNorm(nn.Module):
    """z / RMS(z) over the latent dimension (StyleGAN's mapping-network input normalisation)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * torch.rsqrt(z.square().mean(dim=1, keepdim=True) + 1e-8)


def z_mapping(nz: int, z_emb_dim: int, n_mlp: int) -> nn.Sequential:
    """PixelNorm → Linear(nz, z_emb_dim) → SiLU → n_mlp × [Linear(z_emb_dim, z_emb_dim) → SiLU] (method.md §3)."""
    layers = [PixelNorm(), style_linear(nz, z_emb_dim), nn.SiLU()]
    for _ in range(n_mlp):
        layers += [style_linear(z_emb_dim, z_emb_dim), nn.SiLU()]
    return nn.Sequential(*layers)


class NCSNppGenerator(nn.Module):
    """G_φ(x_{k+1}, k, z) = x₀' ∈ (−1, 1)^{C×H×W}: DDGAN's z-conditioned NCSN++ (method.md §3)."""

    def __init__(self, image_size: int = 32, channels: int = 3, nf: int = 128, ch_mult: Sequence[int] = (1, 2, 2, 2),
                 num_res_blocks: int = 2, attn_resolutions: Sequence[int] = (16,), dropout: float = 0.1,
                 fir: bool = True, progressive_input: str = "residual", num_steps: int = 4, nz: int = 100,
                 z_emb_dim: int = 256, n_mlp: int = 4):
        super().__init__()
        self.nz = nz
        self.unet = NCSNppUNet(image_size, channels, nf, ch_mult, num_res_blocks, attn_resolutions, dropout, fir,
                               progressive_input, num_steps, style_dim=z_emb_dim)
        self.z_mapping = z_mapping(nz, z_emb_dim, n_mlp)

    def forward(self, x_k1: torch.Tensor, k: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.unet(x_k1, k, self.z_mapping(z)))
