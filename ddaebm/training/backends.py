"""The one place that picks a backend (dist.backend): the engines of a trainer, torch or DeepSpeed."""

from __future__ import annotations

from torch import nn

from ddaebm.config import Config
from ddaebm.training.engine import ENGINE_NAMES, Engine, TorchEngine


def build_engines(cfg: Config, networks: dict[str, nn.Module], rank: int, world: int,
                  resume_state: dict | None = None) -> dict[str, Engine]:
    """One engine per network of `networks` ('energy', 'generator') on the configured backend. `resume_state`:
    the checkpoint state about to be loaded, which a backend may need to prepare for (DeepSpeed converts ZeRO
    shards written at another world size)."""
    o, d = cfg.optim, cfg.dist
    lrs = {"energy": o.lr_d, "generator": o.lr_g}
    if d.backend == "torch":  # one process; DeepSpeed is never imported
        return {name: TorchEngine(networks[name], lrs[name], o, d.grad_clip, d.precision) for name in ENGINE_NAMES}
    from ddaebm.training.deepspeed_engine import build_deepspeed_engines

    return build_deepspeed_engines(cfg, networks, lrs, rank, world, resume_state)
