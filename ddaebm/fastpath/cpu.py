"""The fast path's only machine-specific choice: which kernel runs the hidden × hidden products on a CPU.

Both choices compute x·wᵀ (+ bias) in IEEE float32; they differ in speed and in summation order (so in the last
bits). oneDNN's fp32 linear (the op PyTorch's own CPU compiler emits; a private op, hence the fallback) was the
faster on the AMD CPUs this project measured, ATen's matmul through MKL on Intel ones (bench/README.md). The
choice is `train.fast_products` (auto | onednn | aten), made once per process by `configure` where the fast path
is selected, so a run and its resumptions on one machine round the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PRODUCTS = ("auto", "onednn", "aten")
ONEDNN_MIN_FEATURES = 128  # both sides of the weight: the hidden × hidden layers (where oneDNN was measured faster)

_linear_onednn = None  # oneDNN's linear when chosen, else None (ATen)


def cpu_vendor() -> str:
    """The CPU's vendor string as the kernel reports it (e.g. GenuineIntel, AuthenticAMD); "" where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def onednn_linear(choice: str, vendor: str | None = None):
    """oneDNN's fp32 linear where `choice` picks it ("onednn", or "auto" on a CPU that is not Intel's), else None
    (ATen's matmul); None also where this torch build lacks the op (the fallback)."""
    if choice not in PRODUCTS:
        raise ValueError(f"train.fast_products={choice!r}: expected one of {', '.join(PRODUCTS)}")
    if choice == "aten" or (choice == "auto" and (cpu_vendor() if vendor is None else vendor) == "GenuineIntel"):
        return None
    try:
        if torch.backends.mkldnn.is_available():
            return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        pass
    return None


def configure(choice: str) -> None:
    """Fix the hidden products' kernel for this process (train.fast_products)."""
    global _linear_onednn
    _linear_onednn = onednn_linear(choice)


def product(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x·wᵀ (+ bias). A hidden × hidden float32 product on the CPU takes the configured kernel; smaller products,
    other dtypes and devices take ATen (where oneDNN was no faster)."""
    if (_linear_onednn is not None and x.dtype == torch.float32 and x.device.type == "cpu"
            and w.shape[0] >= ONEDNN_MIN_FEATURES and w.shape[1] >= ONEDNN_MIN_FEATURES):
        return _linear_onednn(x, w, bias, "none", [], "")
    return F.linear(x, w, bias)


def t_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """aᵀ·b, as (bᵀ·a)ᵀ (a transposed view) where b is much narrower than a: BLAS's kernel for a wide transposed
    left factor and a narrow right one is the slow one (the first layer's weight gradient)."""
    return (b.t() @ a).t() if 2 * b.shape[1] <= a.shape[1] else a.t() @ b


def uses_onednn() -> bool:
    return _linear_onednn is not None
