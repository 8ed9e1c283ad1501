"""DCGAN-scale image networks (`model.arch: small`): the objective and the image data path at CPU scale.

The NCSN++ U-Nets spend most of their FLOPs in ResBlocks at full resolution: at nf 16 one forward costs ~150
MFLOP per 32² image, and a DDAEBM iteration runs about 12 energy and 6 generator forward-equivalents per image
(R1's double backward, the fake pass, E_F through the energy, the generator's two passes and their backward),
so an hour on one CPU core buys well under a thousand batch-64 iterations. These networks keep the method's
interfaces and conditioning but work at half resolution and below, where wide convolutions run several times
closer to the core's peak (bench figures: configs/small/*.yaml):

- `SmallUNet(x, k[, style])`: a 3×3 stem at full resolution, then per level a 4×4 stride-2 conv down and
  `num_res_blocks` ResBlocks, mirrored by 4×4 stride-2 transposed convs up with additive skips, and a 3×3 output
  conv at full resolution that starts at exactly zero. No ResBlocks at full resolution, no attention. The step k
  enters every ResBlock as a per-channel bias (an MLP of the sinusoidal embedding, method.md §0), the
  generator's z through AdaGN on the mapped z (method.md §3).
- `SmallEnergy` (method.md §2): `model.energy_head: residual` is the paper's f(x, k) = −½‖x − U(x, k)‖² with U a
  SmallUNet (exactly −½‖x‖² at initialisation); `scalar` is a plain DCGAN discriminator: the down path alone
  (stride-2 4×4 convs to 4², SiLU), a linear head to one number, no normalisation. The scalar energy is not
  bounded above in x; the residual one is, by 0.
- `SmallGenerator` (method.md §3): G(x_{k+1}, k, z) = tanh(U(x_{k+1}, k, style(z))), the z mapping as NCSN++'s.
- The encoder is the CIFAR-10 `ConvEncoder('small')` at `model.encoder_ngf` (networks/encoders.py).

Activations are SiLU (smooth: the energy's input gradient feeds R1 and the refinement step x + s·∇f).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ddaebm.networks.embedding import sinusoidal_embedding
from ddaebm.networks.ncsnpp import z_mapping
from ddaebm.networks.ncsnpp_blocks import RSQRT2, conv3x3, linear, make_norm, variance_scaling_, zero_conv3x3

HEADS = ("residual", "scalar")


def _resample_conv(in_ch: int, out_ch: int, up: bool) -> nn.Module:
    """A 4×4 conv at stride 2 (×½) or its transpose (×2), DDPM's variance-scaling init, zero bias."""
    layer = (nn.ConvTranspose2d if up else nn.Conv2d)(in_ch, out_ch, 4, stride=2, padding=1)
    variance_scaling_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class StepEmbedding(nn.Module):
    """SiLU(MLP(sinusoidal(k))) [B, dim]: run on the T distinct steps once per call and gathered by k."""

    def __init__(self, dim: int, num_steps: int):
        super().__init__()
        self.register_buffer("table", sinusoidal_embedding(torch.arange(num_steps), dim), persistent=False)
        self.net = nn.Sequential(linear(dim, dim), nn.SiLU(), linear(dim, dim))

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        return F.silu(F.embedding(k, self.net(self.table)))


class Block(nn.Module):
    """h = conv(SiLU(norm₁(conv(SiLU(norm₀(x)))) + Dense(temb))), out (x + h)/√2; the last conv starts at ~0."""

    def __init__(self, channels: int, temb_dim: int, style_dim: int | None):
        super().__init__()
        self.norm0, self.norm1 = make_norm(channels, style_dim), make_norm(channels, style_dim)
        self.conv0, self.conv1 = conv3x3(channels, channels), conv3x3(channels, channels, init_scale=0.0)
        self.dense = linear(temb_dim, channels)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, style: torch.Tensor | None) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x, style))) + self.dense(temb)[:, :, None, None]
        return (x + self.conv1(F.silu(self.norm1(h, style)))) * RSQRT2


class Level(nn.Module):
    """One step between resolutions: a resampling conv, the skip of the same resolution added (up path), ResBlocks."""

    def __init__(self, resample: nn.Module, blocks: list[Block]):
        super().__init__()
        self.resample, self.blocks = resample, nn.ModuleList(blocks)

    def forward(self, h, temb, style, skip: torch.Tensor | None = None):
        h = self.resample(h)
        if skip is not None:
            h = (h + skip) * RSQRT2
        for block in self.blocks:
            h = block(h, temb, style)
        return h


class SmallUNet(nn.Module):
    """U(x, k[, style]) → [B, channels, H, W] (see the module docstring); widths nf·ch_mult[i] at H/2^i."""

    def __init__(self, image_size: int, channels: int, nf: int, ch_mult: Sequence[int], num_res_blocks: int,
                 num_steps: int, style_dim: int | None = None):
        super().__init__()
        if len(ch_mult) < 2:
            raise ValueError("model.ch_mult needs at least two levels (full resolution and one below)")
        if image_size % 2 ** (len(ch_mult) - 1):
            raise ValueError(f"image_size {image_size} is not divisible by 2^{len(ch_mult) - 1}")
        widths = [nf * m for m in ch_mult]
        temb = 4 * nf
        self.step = StepEmbedding(temb, num_steps)
        self.stem = conv3x3(channels, widths[0])
        blocks = lambda i: [Block(widths[i], temb, style_dim) for _ in range(num_res_blocks if i else 0)]  # noqa: E731
        below = range(1, len(widths))  # level i is at resolution image_size / 2^i; level 0 has no ResBlocks
        self.down = nn.ModuleList([Level(_resample_conv(widths[i - 1], widths[i], up=False), blocks(i)) for i in below])
        self.up = nn.ModuleList([Level(_resample_conv(widths[i], widths[i - 1], up=True), blocks(i - 1))
                                 for i in reversed(below)])
        self.norm_out = make_norm(widths[0], style_dim)
        self.conv_out = zero_conv3x3(widths[0], channels)

    def forward(self, x: torch.Tensor, k: torch.Tensor, style: torch.Tensor | None = None) -> torch.Tensor:
        temb = self.step(k)
        skips = [self.stem(x)]
        for level in self.down:
            skips.append(level(skips[-1], temb, style))
        h = skips.pop()
        for level in self.up:
            h = level(h, temb, style, skips.pop())
        return self.conv_out(F.silu(self.norm_out(h, style)))


class ScalarEnergyNet(nn.Module):
    """A DCGAN discriminator conditioned on k: stride-2 4×4 convs (SiLU, + a step bias) down to ≤ 4², linear → [B]."""

    def __init__(self, image_size: int, channels: int, nf: int, ch_mult: Sequence[int], num_steps: int):
        super().__init__()
        widths = [nf * m for m in ch_mult]
        size = image_size // 2 ** len(widths)
        if size * 2 ** len(widths) != image_size:
            raise ValueError(f"image_size {image_size} is not divisible by 2^{len(widths)}")
        temb = 4 * nf
        self.step = StepEmbedding(temb, num_steps)
        self.convs = nn.ModuleList([_resample_conv(a, b, up=False) for a, b in zip([channels] + widths, widths)])
        self.t_bias = nn.ModuleList([linear(temb, w) for w in widths])
        self.head = nn.Linear(widths[-1] * size * size, 1)
        nn.init.zeros_(self.head.weight)  # f ≡ 0 at initialisation
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        temb, h = self.step(k), x
        for conv, t_bias in zip(self.convs, self.t_bias):
            h = F.silu(conv(h) + t_bias(temb)[:, :, None, None])
        return self.head(h.flatten(1)).squeeze(1)


class SmallEnergy(nn.Module):
    """f_θ(x, k) → [B] in float32: −½‖x − U(x, k)‖² (head 'residual') or a DCGAN scalar (head 'scalar')."""

    def __init__(self, image_size: int = 32, channels: int = 1, nf: int = 32, ch_mult: Sequence[int] = (1, 2, 4),
                 num_res_blocks: int = 1, num_steps: int = 4, head: str = "residual"):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"model.energy_head must be one of {HEADS}, not {head!r}")
        self.head = head
        if head == "residual":
            self.unet = SmallUNet(image_size, channels, nf, ch_mult, num_res_blocks, num_steps)
        else:
            self.net = ScalarEnergyNet(image_size, channels, nf, ch_mult, num_steps)

    def forward(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        if self.head == "scalar":
            return self.net(x, k).float()
        residual = x.float() - self.unet(x, k).float()  # fp32 residual under bf16 autocast, as NCSNppEnergy
        return -0.5 * residual.square().sum(dim=(1, 2, 3))


class SmallGenerator(nn.Module):
    """G_φ(x_{k+1}, k, z) = tanh(U(x_{k+1}, k, mapping(z))) ∈ (−1, 1)^{C×H×W} (method.md §3)."""

    def __init__(self, image_size: int = 32, channels: int = 1, nf: int = 32, ch_mult: Sequence[int] = (1, 2, 4),
                 num_res_blocks: int = 1, num_steps: int = 4, nz: int = 100, z_emb_dim: int = 256, n_mlp: int = 4):
        super().__init__()
        self.nz = nz
        self.unet = SmallUNet(image_size, channels, nf, ch_mult, num_res_blocks, num_steps, style_dim=z_emb_dim)
        self.z_mapping = z_mapping(nz, z_emb_dim, n_mlp)

    def forward(self, x_k1: torch.Tensor, k: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.unet(x_k1, k, self.z_mapping(z)))
