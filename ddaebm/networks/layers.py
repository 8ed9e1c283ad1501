"""Small layers shared by the networks."""

from __future__ import annotations

import torch
from torch import nn


class _PReLUFunction(torch.autograd.Function):
    """y = relu(x) + w·min(x, 0), with a backward built from float ops only.

    ATen's PReLU backward kernel and any bool-mask formulation (where, clamp) cost 5-10× an elementwise
    multiply on this CPU; relu's own backward (threshold_backward) does not. The backward is written with
    differentiable ops, so double backward (the R1 penalty) works through it.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return torch.addcmul(torch.relu(x), x.clamp_max(0), w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        grad_pos = torch.ops.aten.threshold_backward(grad, x, 0.0)  # grad where x > 0, else 0
        grad_neg = grad - grad_pos
        grad_x = torch.addcmul(grad_pos, grad_neg, w)
        grad_w = (grad_neg * x).sum().reshape(w.shape) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w


class PReLU(nn.Module):
    """nn.PReLU() (one learned slope, initialised at 0.25) with a cheaper backward on CPU."""

    def __init__(self, init: float = 0.25):
        super().__init__()
        self.weight = nn.Parameter(torch.full((1,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _PReLUFunction.apply(x, self.weight)
