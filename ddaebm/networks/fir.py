"""FIR up/down-sampling (StyleGAN2's upfirdn2d) in plain PyTorch, for the NCSN++ U-Nets (SPEC §8).

The official code JIT-compiles a CUDA `upfirdn2d` at import, so it cannot even be imported on a CPU box
(SPEC §11 B8). Here the same operator is zero insertion, padding and a depthwise `conv2d` with the flipped
kernel: differentiable to any order (the R1 penalty backpropagates through a gradient), any device, any
dtype, any memory format.

Conventions follow StyleGAN2 / Score-SDE: a 1-D kernel such as [1, 3, 3, 1] becomes the outer product with
itself, normalised to sum 1, so a constant image stays constant (away from the zero-padded border);
upsampling multiplies it by factor² because zero insertion leaves only one pixel in factor² non-zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

DEFAULT_TAPS = (1, 3, 3, 1)


def fir_kernel(taps: Sequence[float] = DEFAULT_TAPS) -> torch.Tensor:
    """The separable 2-D FIR kernel outer(taps, taps) / its sum, [n, n] float32."""
    k = torch.as_tensor(taps, dtype=torch.float32)
    if k.ndim == 1:
        k = torch.outer(k, k)
    return k / k.sum()


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1,
              pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Upsample by zero insertion, pad, convolve with `kernel`, keep every `down`-th sample ([B, C, H', W']).

    pad = (before, after) applies to both spatial axes; a negative value crops. The output size per axis is
    (n·up + before + after − kh) // down + 1. "Convolve" is a true convolution, i.e. a cross-correlation
    with the flipped kernel (the FIR taps used here are symmetric, so the flip only matters for others).
    """
    b, c, h, w = x.shape
    if up > 1:
        # Each pixel becomes the top-left of an up×up block of zeros.
        x = F.pad(x.reshape(b, c, h, 1, w, 1), (0, up - 1, 0, 0, 0, up - 1)).reshape(b, c, h * up, w * up)
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    kh, kw = kernel.shape
    weight = kernel.flip(0, 1).to(x.dtype).reshape(1, 1, kh, kw).expand(c, 1, kh, kw)
    # Depthwise: every channel is filtered by the same kernel; the stride keeps samples 0, down, 2·down, ...
    return F.conv2d(x, weight, stride=down, groups=c)


def upsample_2d(x: torch.Tensor, kernel: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """FIR upsampling by `factor` ([B, C, H·factor, W·factor])."""
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel * factor**2, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: torch.Tensor, kernel: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """FIR downsampling by `factor` ([B, C, H/factor, W/factor])."""
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, down=factor, pad=((p + 1) // 2, p // 2))


def upsample_conv_2d(x: torch.Tensor, weight: torch.Tensor, kernel: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Upsampling then a conv with `weight` [out, in, k, k], then the FIR filter, padded once (StyleGAN2's fused op).

    The strided transposed convolution with the spatially flipped weight is "insert zeros, then cross-correlate
    with `weight`"; the FIR filter then fills the inserted zeros in.
    """
    conv = weight.shape[-1]
    p = (kernel.shape[0] - factor) - (conv - 1)
    x = F.conv_transpose2d(x, weight.flip(2, 3).transpose(0, 1), stride=factor)
    return upfirdn2d(x, kernel * factor**2, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


def conv_downsample_2d(x: torch.Tensor, weight: torch.Tensor, kernel: torch.Tensor, factor: int = 2,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """The FIR filter then a conv with `weight` [out, in, k, k] (and `bias`) at stride `factor`, padded once."""
    conv = weight.shape[-1]
    p = (kernel.shape[0] - factor) + (conv - 1)
    return F.conv2d(upfirdn2d(x, kernel, pad=((p + 1) // 2, p // 2)), weight, bias, stride=factor)


def naive_upsample_2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Nearest-neighbour upsampling (each pixel repeated factor × factor): the resampling when FIR is off."""
    return F.interpolate(x, scale_factor=factor, mode="nearest")


def naive_downsample_2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """The mean of each factor × factor block: the resampling when FIR is off."""
    return F.avg_pool2d(x, factor)
