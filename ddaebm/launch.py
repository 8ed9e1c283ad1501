"""The launch check: whether a config can run on the ranks and devices at hand, before anything is written.

Every entry point that starts training calls `check_launch` (the command line, Ray Train jobs, sweeps), so a
batch that does not divide over the ranks, a one-process backend under a launcher, or a device this machine
lacks is refused in one line, by the same rule everywhere.
"""

from __future__ import annotations

import torch

from ddaebm.config import Config, ConfigError


def check_launch(cfg: Config, world: int, cuda_available: bool | None = None) -> None:
    """Raise ConfigError (naming the key) when `cfg` cannot train on `world` ranks of this machine."""
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    d = cfg.dist
    if cfg.data.batch % world:
        raise ConfigError(f"data.batch={cfg.data.batch} is the global batch and must divide over the {world} ranks "
                          "(per-rank batch = data.batch / world)")
    if d.backend == "torch" and world > 1:
        raise ConfigError(f"dist.backend=torch trains in one process; add dist.backend=deepspeed for {world} ranks")
    if d.device == "cuda" and not cuda:
        raise ConfigError("dist.device=cuda but CUDA is not available here; use dist.device=auto or cpu")
    if d.precision == "fp16" and (d.device == "cpu" or not cuda):
        raise ConfigError("dist.precision=fp16 needs a GPU (DeepSpeed's fp16 mode); use bf16 or fp32 on the CPU")
