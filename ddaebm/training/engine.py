"""Engines: one network, the optimizer that trains it, its precision and its part of a checkpoint.

`Engine` is the whole surface the trainer, the loop and the checkpoint code use; both backends implement it
(`TorchEngine` here, one process; `DeepSpeedEngine` in ddaebm/training/deepspeed_engine.py, any number of
ranks), and ddaebm/training/backends.py is the one place that picks a backend, so nothing above branches on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ddaebm.config import OptimConfig
from ddaebm.training.perf import fast_adam_steps, flatten_parameters
from ddaebm.networks.precision import autocast_bf16

ENGINE_NAMES = ("energy", "generator")  # the energy f_θ; the generator+encoder (one optimizer, method.md §5)


class Engine(Protocol):
    module: nn.Module  # the network it trains (the same object the model holds)

    def zero_grad(self) -> None: ...

    def backward_agreed(self, loss: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
        """Backward, and `flags` ([non-finite loss, stop request] as 0/1 on the loss's device) maxed over all
        ranks, which every rank must act on alike; no host read."""

    def step(self, skip: torch.Tensor) -> None:
        """The optimizer step, skipped where `skip` (a 0-dim 0/1 tensor: the agreed non-finite flag) is 1: on the
        device where the optimizer can (fused Adam's found_inf), by a host read where it cannot."""

    def set_lr(self, lr: float) -> None: ...

    def state_dict(self) -> dict:
        """What the checkpoint's state.pt carries of this engine: {"module": fp32 weights, "optimizer": ... or
        None where the optimizer state lives in `save`'s folder}."""

    def load_state_dict(self, state: dict) -> None: ...

    def save(self, folder: Path) -> None:
        """Collective: write what state.pt cannot carry (sharded state) under `folder`; every rank calls it."""

    def load(self, folder: Path) -> None:
        """Collective: read back what `save` wrote (after load_state_dict)."""


def step_on_device(optimizer: torch.optim.Optimizer, skip: torch.Tensor, step=None) -> None:
    """`step()` (default optimizer.step, which may also be a wrapper that calls it) unless `skip` is 1. Fused
    Adam takes the flag as its found_inf and skips in the kernel, so the host never waits for the GPU; any other
    optimizer needs the flag on the host first."""
    step = optimizer.step if step is None else step
    if optimizer.param_groups[0].get("fused"):
        optimizer.found_inf = skip.to(torch.float32)
        try:
            step()  # the direct fused kernels wherever they apply (fast_adam_steps)
        finally:
            optimizer.found_inf = None
    elif not skip.item():
        step()


def adam(params: list, lr: float, cfg: OptimConfig) -> torch.optim.Adam:
    """Adam(β1, β2) without weight decay (method.md §5), fused kernels when cfg.fused, for either backend.

    (DeepSpeed's own choice on CPU, `torch_adam`, is the unfused AdamW, about ten times slower here. ZeRO 1/2
    wrap this like their own Adam: torch.optim.Adam is on DeepSpeed's list of ZeRO optimizers.)
    """
    return torch.optim.Adam(params, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, weight_decay=0.0,
                            fused=cfg.fused or None)


class TorchEngine:
    """A module and its Adam in one process; the module's parameters laid out in one buffer (flatten_parameters),
    bf16 autocast inside it with dist.precision=bf16. Its whole state fits in state.pt, so save/load have no
    folder of their own to write."""

    def __init__(self, module: nn.Module, lr: float, cfg: OptimConfig, grad_clip: float = 0.0,
                 precision: str = "fp32"):
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"the torch backend trains in fp32 or bf16, not {precision}")
        self.module, self.grad_clip = module, grad_clip
        flatten_parameters(module)
        params = [p for p in module.parameters() if p.requires_grad]
        self.params = params
        self.optimizer = adam(params, lr, cfg)
        fast_adam_steps(self.optimizer)
        if precision == "bf16":
            autocast_bf16(module)

    def zero_grad(self) -> None:
        # Optimizer.zero_grad(set_to_none=True) without its per-call profiling and grouping set-up.
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                p.grad = None

    def backward_agreed(self, loss: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
        loss.backward()  # a non-finite loss gives non-finite gradients, whose step is skipped
        return flags  # one process: its own flags are everyone's

    def step(self, skip: torch.Tensor) -> None:
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        step_on_device(self.optimizer, skip)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        if state["optimizer"] is not None:  # None: weights of a DeepSpeed run (its optimizer state is sharded)
            self.optimizer.load_state_dict(state["optimizer"])

    def save(self, folder: Path) -> None:
        pass  # everything is in state_dict

    def load(self, folder: Path) -> None:
        pass
