"""The launch check: whether a config can run on the ranks and devices at hand, before anything is written.

Every entry point that starts training calls `check_launch` (the command line, Ray Train jobs, sweeps), so a
batch that does not divide over the ranks, a one-process backend under a launcher, a device or backend this
machine lacks, a dataset that is not there, a network the config cannot build or a noise schedule that is not a
diffusion is refused in one line, by the same rule everywhere. The config's own value checks (ranges, choices,
relations between keys) ran when it was loaded (ddaebm/config); these are the ones that need the machine, the
data, or the domain's formulas.
"""

from __future__ import annotations

import importlib.util

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
    if d.backend == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("dist.backend=deepspeed but DeepSpeed is not installed here (pip install -c constraints.txt "
                          "'ddaebm[dist]'); or use dist.backend=torch on one process")
    if d.device == "cuda" and not cuda:
        raise ConfigError("dist.device=cuda but CUDA is not available here; use dist.device=auto or cpu")
    if d.precision == "fp16" and (d.device == "cpu" or not cuda):
        raise ConfigError("dist.precision=fp16 needs a GPU (DeepSpeed's fp16 mode); use bf16 or fp32 on the CPU")
    if cfg.model.arch == "toy" and cfg.model.gen_norm == "batch" and cfg.data.batch // world < 2:
        raise ConfigError(f"data.batch={cfg.data.batch} leaves {cfg.data.batch // world} row per rank, and the toy "
                          "generator's BatchNorm needs at least 2 in training (or model.gen_norm=none)")
    _check_dataset_kind(cfg)
    check_networks(cfg)
    check_schedule(cfg)


def _check_dataset_kind(cfg: Config) -> None:
    """A toy distribution trains the toy networks on 2-D points; anything else is a shard set under data.root."""
    from ddaebm.data.toy import TOY_DATASETS

    d, arch = cfg.data, cfg.model.arch
    if d.dataset in TOY_DATASETS:
        if arch != "toy" or cfg.model.data_dim != 2:
            raise ConfigError(f"data.dataset={d.dataset} is a 2-D toy distribution: it trains model.arch=toy with "
                              f"model.data_dim=2 (got {arch}, {cfg.model.data_dim})")
        return
    if arch == "toy":
        raise ConfigError(f"data.dataset={d.dataset!r} is not a toy dataset ({', '.join(TOY_DATASETS)}), and "
                          "model.arch=toy trains on those only")
    if not d.root:
        raise ConfigError(f"data.dataset={d.dataset!r} is not a toy dataset, so it is read from shards: "
                          "set data.root to the folder holding them")


def check_data_present(cfg: Config) -> None:
    """The shard set of an image config is on this machine's disk, with its manifest (the training command checks
    it before anything is written; a cluster driver may not see the workers' data, so check_launch does not)."""
    from ddaebm.data.stream import is_toy

    d = cfg.data
    if is_toy(cfg):
        return
    from ddaebm.data.shards import load_manifest

    load_manifest(d.root, d.dataset, d.split)  # MissingFile / BadValue name the folder and file
    if d.loader == "dali":
        from ddaebm.data.images import dali_available

        if not dali_available():
            raise ConfigError("data.loader=dali but NVIDIA DALI is not installed here; use data.loader=pil or auto")


def check_networks(cfg: Config) -> None:
    """The image U-Net's shape rules (method.md §8), which its constructor would otherwise raise deep inside."""
    m = cfg.model
    if m.arch != "ncsnpp":
        return
    from ddaebm.networks.ncsnpp_blocks import num_groups

    levels = len(m.ch_mult)
    if m.image_size % 2 ** (levels - 1):
        raise ConfigError(f"model.image_size={m.image_size} must be divisible by 2^(len(model.ch_mult) - 1) = "
                          f"{2 ** (levels - 1)}")
    for width in sorted({m.nf * mult for mult in m.ch_mult} | {m.nf}):
        if width % num_groups(width):
            raise ConfigError(f"model.nf={m.nf} with model.ch_mult={list(m.ch_mult)} gives {width} channels, which "
                              f"GroupNorm cannot split into min(C/4, 32) = {num_groups(width)} groups")


def check_schedule(cfg: Config) -> None:
    """The forward process the diffusion keys give is one: increasing times, β in (0, 1), every posterior
    coefficient finite (method.md §1). Catches combinations no single range can (a geometric variance beyond 1,
    a DRL grid too fine for its 1000-step base)."""
    from ddaebm.diffusion.schedule import build_schedule

    s = build_schedule(cfg.diffusion)
    parts = {"t": s.t, "alpha_bar": s.alpha_bar, "beta": s.beta, "post_c1": s.post_c1, "post_c2": s.post_c2,
             "post_var": s.post_var}
    bad = [name for name, v in parts.items() if not torch.isfinite(v).all()]
    if bad or not ((s.t[1:] > s.t[:-1]).all() and (s.beta[1:] > 0).all() and (s.beta < 1).all() and s.beta[0] >= 0):
        d = cfg.diffusion
        raise ConfigError(f"diffusion.* (variance={d.variance}, grid={d.grid}, beta_min={d.beta_min}, "
                          f"beta_max={d.beta_max}, num_steps={d.num_steps}) is not a forward process: "
                          + (f"{', '.join(bad)} not finite" if bad
                             else "times must increase and every β lie in (0, 1)"))
