"""Engines: one network and the optimizer that trains it.

The training loop talks to an engine only through `module`, `zero_grad`, `backward`, `step`, `set_lr` and
`state_dict`/`load_state_dict`, the same surface a DeepSpeed engine offers, so a multi-rank backend plugs in
without touching the loop.
"""

from __future__ import annotations

import torch
from torch import nn

from ddaebm.config import OptimConfig


class TorchEngine:
    """A module and its Adam(β1, β2) without weight decay (SPEC §5), in one process."""

    def __init__(self, module: nn.Module, lr: float, cfg: OptimConfig, grad_clip: float = 0.0):
        self.module, self.grad_clip = module, grad_clip
        params = [p for p in module.parameters() if p.requires_grad]
        self.params = params
        self.optimizer = torch.optim.Adam(params, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                                          weight_decay=0.0, fused=cfg.fused or None)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        if state["optimizer"] is not None:  # None: weights of a DeepSpeed run, restored to sample or evaluate
            self.optimizer.load_state_dict(state["optimizer"])
