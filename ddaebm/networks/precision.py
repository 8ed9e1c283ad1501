"""Mixed precision around the networks: bf16 autocast inside them, fp32 for everything the losses compute.

method.md §11: R1 with AMP needs fp32, and the energies f = −½‖x − U‖² are compared across real and fake, so the
networks' outputs, the R1 square norm and the transition log-densities stay fp32; only the layers run in
half precision. Both backends use this (dist.precision).
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch import nn


def _fp32(out):
    if torch.is_tensor(out):
        return out.float() if out.is_floating_point() else out
    return type(out)(_fp32(o) for o in out)


def _autocast_forward(self, *args, **kwargs):
    with torch.autocast(self.autocast_device, dtype=torch.bfloat16, enabled=self.autocast_enabled):
        out = type(self).forward(self, *args, **kwargs)
    return _fp32(out)


def autocast_bf16(module: nn.Module) -> None:
    """bf16 compute inside the networks, fp32 everywhere else (weights, Adam, losses, R1's square norm).

    The networks mix dtypes internally (the step embedding is built in fp32), so casting the weights to bf16
    (DeepSpeed's bf16 mode) breaks them; autocast picks the dtype per operation instead. The wrapper is a
    bound method, so a deep copy (the EMA's shadow) rebinds it to the copy.
    """
    device = "cuda" if next(module.parameters()).is_cuda else "cpu"
    callable_modules = [module] if type(module).forward is not nn.Module.forward else list(module.children())
    for m in callable_modules:
        if m is not None:
            m.autocast_device, m.autocast_enabled = device, True
            m.forward = types.MethodType(_autocast_forward, m)


@contextlib.contextmanager
def full_precision(module: nn.Module):
    """Within: `module` (wrapped by autocast_bf16) computes in fp32, e.g. the real pass whose input gradient R1
    penalises (loss.r1_precision=fp32: a bf16 ∇ₓf is too coarse for a penalty on its square norm, method.md
    §11). A module without the wrapper (fp32 already, or DeepSpeed fp16 weights) is left as it is."""
    modules = module.modules() if isinstance(module, nn.Module) else ()  # (a plain function: nothing to switch)
    wrapped = [m for m in modules if "autocast_enabled" in m.__dict__]
    for m in wrapped:
        m.autocast_enabled = False
    try:
        yield module
    finally:
        for m in wrapped:
            m.autocast_enabled = True


def _cast_inputs(module: nn.Module, args: tuple) -> tuple:
    dtype = next(module.parameters()).dtype
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _outputs_to_fp32(module: nn.Module, args: tuple, out):
    return _fp32(out)


def keep_losses_in_fp32(module: nn.Module) -> None:
    """Half-precision networks take fp32 inputs and return fp32 outputs.

    So the losses, the R1 penalty's square norm and the transition log-densities around the networks are
    computed in fp32; only the networks' own layers run in bf16/fp16. Hooks go on the modules the losses call
    (a container such as GeneratorEncoder has no forward of its own: its children).
    """
    callable_modules = [module] if type(module).forward is not nn.Module.forward else list(module.children())
    for m in filter(None, callable_modules):
        m.register_forward_pre_hook(_cast_inputs)
        m.register_forward_hook(_outputs_to_fp32)
