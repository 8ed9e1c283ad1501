"""Convolutional encoders q_ψ(z | x_k, x_{k+1}, k) for images (method.md §4).

Three bodies behind one class, `ConvEncoder(kind, ...)`:
- 'small' (CIFAR-10 32², the official `Encoder_small`): conv3×3 → ngf, then 4×4 stride-2 convs to 2·ngf, 4·ngf,
  8·ngf; every conv bias-free, followed by LeakyReLU(0.2) and a per-channel additive Dense(t_emb).
  Heads: a 4×4 valid conv (the whole remaining map) → (μ, logvar).
- '64' (CelebA 64², `Encoder_64`): the same with one more stride-2 stage to 16·ngf.
- 'large' (LSUN 128², `Encoder_large`): the body of DDGAN's large discriminator. A 1×1 conv to 2·ngf, six
  residual DownConvBlocks with FIR downsampling (2·ngf → 4·ngf → 8·ngf → … → 8·ngf), minibatch-stddev,
  a 3×3 conv, LeakyReLU, spatial *sum* pooling, then dense heads with logvar = −softplus(·), i.e. σ² ≤ 1.

Differences from the official code, on purpose (method.md §4, §11):
- the heads are flattened, never `.squeeze()`d, so batch size 1 works (bug B5);
- logvar is clamped to [logvar_min, logvar_max] for every kind (the official small/64 encoders leave it
  unconstrained; for 'large' −softplus already bounds it by 0, and the clamp adds only the floor);
- minibatch-stddev uses the largest group ≤ 4 that divides the batch, where the official code
  (group = min(B, 4)) crashes on a batch of 6 (see `minibatch_stddev`).
μ and logvar share one head of 2·nz outputs: the same parameters as two heads of nz, one matmul/conv.
FIR downsampling is `ddaebm.networks.fir` (plain PyTorch, no JIT-compiled CUDA op: method.md §11 B8).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ddaebm.networks.embedding import sinusoidal_embedding
from ddaebm.networks.fir import downsample_2d, fir_taps

KINDS = ("small", "64", "large")
SLOPE = 0.2  # LeakyReLU slope of every encoder activation
STDDEV_GROUP = 4  # largest minibatch-stddev group (DDGAN's stddev_group)


def ddgan_init_(weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """DDGAN's `dense`/`conv2d` init, which the official encoders use: U(±√(3·scale/fan_out)), fan_out = out·k².

    Its "fan_avg" mode falls through to fan_out in `_calculate_correct_fan`; we keep what it does, not what
    it says. scale 0 means a gain of 1e-10 (DDGAN's `init_scale=0.`), i.e. ≈ 0 but not exactly 0.
    """
    fan_out = weight.shape[0] * weight[0, 0].numel()
    bound = math.sqrt(3 * (scale if scale > 0 else 1e-10) / max(1.0, fan_out))
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


def dense(n_in: int, n_out: int, scale: float = 1.0) -> nn.Linear:
    layer = nn.Linear(n_in, n_out)
    ddgan_init_(layer.weight, scale)
    nn.init.zeros_(layer.bias)
    return layer


def conv(n_in: int, n_out: int, kernel: int, padding: int, bias: bool = True, scale: float = 1.0) -> nn.Conv2d:
    layer = nn.Conv2d(n_in, n_out, kernel, padding=padding, bias=bias)
    ddgan_init_(layer.weight, scale)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


class StepMLP(nn.Module):
    """t_emb = LeakyReLU(MLP(sinusoidal(dim) → dim → LeakyReLU → dim)) of the integer step k (method.md §4)."""

    def __init__(self, dim: int = 256, num_steps: int = 4):
        super().__init__()
        self.net = nn.Sequential(dense(dim, dim), nn.LeakyReLU(SLOPE), dense(dim, dim), nn.LeakyReLU(SLOPE))
        self.register_buffer("table", sinusoidal_embedding(torch.arange(num_steps), dim), persistent=False)

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        # Only T distinct inputs: run the MLP on those and gather, rather than on B copies.
        return F.embedding(k, self.net(self.table))


def stddev_group(batch: int, max_group: int = STDDEV_GROUP) -> int:
    """The largest divisor of `batch` that is ≤ max_group: 4 for B = 8, 3 for B = 6, 1 for B = 1 or 7."""
    return max(g for g in range(1, min(batch, max_group) + 1) if batch % g == 0)


def minibatch_stddev(h: torch.Tensor, max_group: int = STDDEV_GROUP) -> torch.Tensor:
    """h with one more channel: the std over a group of samples, averaged over channels and pixels.

    As in DDGAN, sample i is grouped with samples i ± B/G, i ± 2B/G, … (a view of [G, B/G, …]).
    With G = 1 (a batch of 1 or of a prime > 4) the channel is the constant √1e-8.
    """
    b, c, height, width = h.shape
    g = stddev_group(b, max_group)
    std = (h.reshape(g, b // g, c, height, width).var(0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))
    std = std.view(1, b // g, 1, 1, 1).expand(g, b // g, 1, height, width).reshape(b, 1, height, width)
    return torch.cat([h, std], dim=1)


class StridedBody(nn.Module):
    """`Encoder_small` / `Encoder_64`: [conv → LeakyReLU → + Dense(t)] × depth, then one conv head → [B, 2·nz]."""

    def __init__(self, in_ch: int, ngf: int, depth: int, image_size: int, nz: int, t_emb_dim: int):
        super().__init__()
        widths = [ngf * 2**i for i in range(depth)]
        final = image_size // 2 ** (depth - 1)
        if final * 2 ** (depth - 1) != image_size:
            raise ValueError(f"image_size {image_size} is not divisible by {2 ** (depth - 1)}")
        # PyTorch's default conv init, as the official code (only its Dense layers use DDGAN's init).
        self.convs = nn.ModuleList([nn.Conv2d(in_ch, widths[0], 3, 1, 1, bias=False)] + [
            nn.Conv2d(w_in, w_out, 4, 2, 1, bias=False) for w_in, w_out in zip(widths[:-1], widths[1:])])
        self.t_bias = nn.ModuleList([dense(t_emb_dim, w) for w in widths])
        # The head sees the whole remaining map (4×4 at the dataset sizes): a valid conv gives 1×1.
        self.head = nn.Conv2d(widths[-1], 2 * nz, final)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        h = x
        for conv_, t_bias in zip(self.convs, self.t_bias):
            h = F.leaky_relu(conv_(h), SLOPE) + t_bias(t_emb)[:, :, None, None]
        return self.head(h).flatten(1)


class DownConvBlock(nn.Module):
    """DDGAN's residual block: act → conv3×3 → + Dense(t) → act → FIR↓ → conv3×3 (init ≈ 0), skip 1×1 of FIR↓(x).

    The sum is divided by √2 to keep the variance of the residual stream.
    """

    def __init__(self, n_in: int, n_out: int, t_emb_dim: int):
        super().__init__()
        self.conv1 = conv(n_in, n_out, 3, 1)
        self.conv2 = conv(n_out, n_out, 3, 1, scale=0.0)
        self.t_bias = dense(t_emb_dim, n_out)
        self.skip = conv(n_in, n_out, 1, 0, bias=False)
        self.register_buffer("kernel", fir_taps(), persistent=False)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.leaky_relu(x, SLOPE)) + self.t_bias(t_emb)[:, :, None, None]
        h = self.conv2(downsample_2d(F.leaky_relu(h, SLOPE), self.kernel))
        return (h + self.skip(downsample_2d(x, self.kernel))) / math.sqrt(2)


class ResidualBody(nn.Module):
    """`Encoder_large`: 1×1 conv, six DownConvBlocks, minibatch-stddev, conv3×3, act, sum-pool, dense → [B, 2·nz]."""

    def __init__(self, in_ch: int, ngf: int, image_size: int, nz: int, t_emb_dim: int, blocks: int = 6):
        super().__init__()
        if image_size % 2**blocks:
            raise ValueError(f"image_size {image_size} is not divisible by {2 ** blocks}")
        widths = [2 * ngf, 4 * ngf] + [8 * ngf] * (blocks - 1)
        self.start = conv(in_ch, widths[0], 1, 0)
        self.blocks = nn.ModuleList([DownConvBlock(a, b, t_emb_dim) for a, b in zip(widths[:-1], widths[1:])])
        self.final = conv(widths[-1] + 1, widths[-1], 3, 1)
        self.head = dense(widths[-1], 2 * nz)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        h = self.start(x)
        for block in self.blocks:
            h = block(h, t_emb)
        h = F.leaky_relu(self.final(minibatch_stddev(h)), SLOPE)
        return self.head(h.sum(dim=(2, 3)))  # sum, not mean, pooling (as DDGAN)


class ConvEncoder(nn.Module):
    """q_ψ(z | x_k, x_{k+1}, k) = N(μ, diag e^logvar) for images in [−1, 1] (method.md §4).

    kind: 'small' (CIFAR 32²), '64' (CelebA 64²) or 'large' (LSUN 128²); channels: image channels (the
    encoder sees 2·channels); k: the integer index of the target x_k, [B] long.
    """

    def __init__(self, kind: str, image_size: int, channels: int, nz: int, ngf: int = 64, t_emb_dim: int = 256,
                 num_steps: int = 4, logvar_min: float = -10.0, logvar_max: float = 2.0):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown encoder kind {kind!r}; expected one of {KINDS}")
        self.kind, self.nz = kind, nz
        self.logvar_range = (logvar_min, logvar_max)
        self.step = StepMLP(t_emb_dim, num_steps)
        if kind == "large":
            self.body = ResidualBody(2 * channels, ngf, image_size, nz, t_emb_dim)
        else:
            depth = 4 if kind == "small" else 5
            self.body = StridedBody(2 * channels, ngf, depth, image_size, nz, t_emb_dim)

    def forward(self, x_k: torch.Tensor, x_k1: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.body(torch.cat([x_k, x_k1], dim=1), self.step(k)).chunk(2, dim=1)
        if self.kind == "large":
            logvar = -F.softplus(logvar)  # σ² ≤ 1, as the official Encoder_large
        return mu, logvar.clamp(*self.logvar_range)
