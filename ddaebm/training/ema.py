"""Exponential moving averages of the generator+encoder and of the energy (SPEC §5, §13).

Explicit shadow copies, updated after every iteration and independent of `requires_grad` (the official
swap skipped the frozen energy, so its saved D was raw). The raw networks live in the engines, so a
checkpoint holds both the raw and the EMA energy.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, modules: dict[str, nn.Module], decay: float):
        self.decay = decay
        # fp32 shadows even when the engines train in bf16: a half-precision average loses small updates.
        self.shadow = {name: copy.deepcopy(m).float().requires_grad_(False).eval() for name, m in modules.items()}

    @torch.no_grad()
    def update(self, modules: dict[str, nn.Module]) -> None:
        for name, module in modules.items():
            shadow = self.shadow[name]
            params = [p if p.dtype == torch.float32 else p.float() for p in module.parameters()]
            torch._foreach_lerp_(list(shadow.parameters()), params, 1.0 - self.decay)
            for b_ema, b in zip(shadow.buffers(), module.buffers()):
                b_ema.copy_(b)

    def state_dict(self) -> dict:
        return {name: m.state_dict() for name, m in self.shadow.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, m in self.shadow.items():
            m.load_state_dict(state[name])
