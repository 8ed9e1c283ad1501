"""FIR up/down-sampling (StyleGAN2's upfirdn2d) in plain PyTorch, for the NCSN++ U-Nets (method.md §8).

The official code JIT-compiles a CUDA `upfirdn2d` at import, so it cannot even be imported on a CPU box
(method.md §11 B8). Here the same operator is zero insertion, padding and a depthwise `conv2d` with the flipped
kernel: differentiable to any order (the R1 penalty backpropagates through a gradient), any device, any
dtype, any memory format.

Conventions follow StyleGAN2 / Score-SDE: a 1-D kernel such as [1, 3, 3, 1] becomes the outer product with
itself, normalised to sum 1, so a constant image stays constant (away from the zero-padded border);
upsampling multiplies it by factor² because zero insertion leaves only one pixel in factor² non-zero.

Every function takes the kernel either as the 2-D [n, n] filter (`fir_kernel`) or as the 1-D taps of a
separable one (`fir_taps`, the same filter: outer(taps, taps)). The networks use the 1-D form: it runs as a few
shifted, strided multiply-adds per axis (upsampling by polyphase, without the inserted zeros), which on a CPU
is several times faster than the depthwise convolution once R1's double backward goes through it
(bench/README.md).
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


def fir_taps(taps: Sequence[float] = DEFAULT_TAPS) -> torch.Tensor:
    """The 1-D taps / their sum, [n] float32: the separable form of fir_kernel(taps)."""
    k = torch.as_tensor(taps, dtype=torch.float32)
    return k / k.sum()


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1,
              pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Upsample by zero insertion, pad, convolve with `kernel`, keep every `down`-th sample ([B, C, H', W']).

    pad = (before, after) applies to both spatial axes; a negative value crops. The output size per axis is
    (n·up + before + after − kh) // down + 1. "Convolve" is a true convolution, i.e. a cross-correlation
    with the flipped kernel (the FIR taps used here are symmetric, so the flip only matters for others).
    A 1-D `kernel` is the separable filter outer(kernel, kernel).
    """
    if kernel.dim() == 1:
        for dim in (2, 3):
            x = _upfirdn1d(x, kernel.flip(0).tolist() if x.device.type == "cpu" else kernel.flip(0), dim, up, down,
                           pad)
        return x
    return _upfirdn2d_depthwise(x, kernel, up, down, pad)


def _shifted(x: torch.Tensor, dim: int, start: int, length: int, step: int = 1) -> torch.Tensor:
    """x[start : start + step·(length − 1) + 1 : step] along `dim` (the view a tap multiplies)."""
    view = x.narrow(dim, start, step * (length - 1) + 1)
    return view if step == 1 else view[(slice(None),) * dim + (slice(None, None, step),)]


def _upfirdn1d(x: torch.Tensor, f, dim: int, up: int, down: int, pad: tuple[int, int]) -> torch.Tensor:
    """upfirdn along one axis with the (already flipped) taps f: y[j] = Σ_k f[k]·z[j·down + k], z the zero-inserted,
    padded input. With up > 1 only the taps that meet an input sample are applied (polyphase)."""
    n, taps = x.shape[dim], len(f)
    size = (n * up + pad[0] + pad[1] - taps) // down + 1
    if up == 1:
        z = _pad1d(x, dim, pad[0], pad[1])
        return sum(f[k] * _shifted(z, dim, k, size, down) for k in range(taps))
    if down != 1 or size % up:
        raise ValueError(f"separable FIR supports up or down alone with whole phases (up={up}, down={down})")
    # Output j = i·up + r reads input (i·up + r + k − pad0)/up for the taps k with (r + k − pad0) ≡ 0 (mod up).
    lo = max(0, -min((r + k - pad[0]) // up for r in range(up) for k in range(taps)))
    hi = max(0, max((r + k - pad[0]) // up for r in range(up) for k in range(taps)) + size // up - n)
    xp = _pad1d(x, dim, lo, hi)
    phases = []
    for r in range(up):
        terms = [f[k] * xp.narrow(dim, (r + k - pad[0]) // up + lo, size // up)
                 for k in range(taps) if (r + k - pad[0]) % up == 0]
        phases.append(sum(terms) if terms else torch.zeros_like(xp.narrow(dim, 0, size // up)))
    return torch.stack(phases, dim=dim + 1).flatten(dim, dim + 1)


def _pad1d(x: torch.Tensor, dim: int, before: int, after: int) -> torch.Tensor:
    if before == after == 0:
        return x
    spec = [0, 0] * (x.dim() - 1 - dim) + [before, after]
    return F.pad(x, spec)


def _upfirdn2d_depthwise(x: torch.Tensor, kernel: torch.Tensor, up: int, down: int,
                         pad: tuple[int, int]) -> torch.Tensor:
    b, c, h, w = x.shape
    if up > 1:
        # Each pixel becomes the top-left of an up×up block of zeros.
        x = F.pad(x.reshape(b, c, h, 1, w, 1), (0, up - 1, 0, 0, 0, up - 1)).reshape(b, c, h * up, w * up)
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    kh, kw = kernel.shape
    weight = kernel.flip(0, 1).to(x.dtype).reshape(1, 1, kh, kw).expand(c, 1, kh, kw)
    # Depthwise: every channel is filtered by the same kernel; the stride keeps samples 0, down, 2·down, ...
    return F.conv2d(x, weight, stride=down, groups=c)


def _gain(kernel: torch.Tensor, factor: int) -> torch.Tensor:
    """The kernel scaled for zero insertion: factor² in 2-D, factor per axis for separable taps."""
    return kernel * factor ** kernel.dim()


def upsample_2d(x: torch.Tensor, kernel: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """FIR upsampling by `factor` ([B, C, H·factor, W·factor])."""
    p = kernel.shape[0] - factor
    return upfirdn2d(x, _gain(kernel, factor), up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


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
    return upfirdn2d(x, _gain(kernel, factor), pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


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
