"""Training data streams: an endless sequence of batches whose position is part of the checkpoint."""

from __future__ import annotations

import torch

from ddaebm.config import Config, ConfigError


class ToyStream:
    """A fresh batch of a 2-D toy distribution every iteration (method.md §9: infinite data, no fixed set).

    Every rank draws the same global batch from the same generator and keeps its own slice, so ranks train on
    different data and the run sees the same global sequence at any world size (edm2's idea): a resume on
    another number of ranks continues it exactly. Drawing 2-D points is cheap next to a training step. The
    generator state is the stream's position, identical on all ranks.
    """

    data_shape = (2,)

    def __init__(self, dataset: str, batch: int, seed: int, rank: int = 0, world: int = 1):
        from ddaebm.data.toy import TOY_DATASETS

        if dataset not in TOY_DATASETS:
            raise ConfigError(f"data.dataset={dataset!r} is not a toy dataset ({', '.join(TOY_DATASETS)})")
        self.dataset, self.batch, self.rank, self.world = dataset, batch, rank, world
        self.rng = torch.Generator().manual_seed(seed * 1_000_003)

    def next_batch(self) -> torch.Tensor:
        """This rank's slice of the next global batch (the global batch itself on one rank)."""
        from ddaebm.data.toy import sample_toy

        x = sample_toy(self.dataset, self.batch * self.world, self.rng)
        return x if self.world == 1 else x[self.rank * self.batch:(self.rank + 1) * self.batch]

    def state_dict(self) -> dict:
        return {"rng": self.rng.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.set_state(state["rng"])


def is_toy(cfg: Config) -> bool:
    from ddaebm.data.toy import TOY_DATASETS

    return cfg.data.dataset in TOY_DATASETS


def resolution(cfg: Config) -> int:
    return cfg.data.resolution or cfg.model.image_size


def data_shape(cfg: Config) -> tuple[int, ...]:
    """The shape of one training sample, from the config alone (sampling needs no data)."""
    if cfg.model.arch == "ncsnpp":
        return (cfg.model.channels, resolution(cfg), resolution(cfg))
    return (cfg.model.data_dim,)


def image_stream_args(cfg: Config) -> dict:
    """Where a shard set is and how it is preprocessed (ddaebm/data/images.py, decode.py), from the data config."""
    d = cfg.data
    if not d.root:
        raise ConfigError(f"data.dataset={d.dataset!r} is not a toy dataset, so it is read from shards: "
                          "set data.root to the folder holding them")
    return dict(root=d.root, name=d.dataset, split=d.split, resolution=resolution(cfg), channels=cfg.model.channels,
                preprocess=d.preprocess, loader=d.loader, workers=d.workers, on_error=d.on_error)


def build_stream(cfg: Config, rank: int = 0, world: int = 1, device: torch.device | None = None):
    """The training stream of this rank: a toy distribution or a shard set (global batch / world rows each).

    `device`: the training device; DALI decodes on that GPU (`mixed`), or on the CPU when training there.
    """
    d = cfg.data  # that data.batch divides over the ranks is the launch check's (ddaebm/launch.py)
    if is_toy(cfg):
        return ToyStream(d.dataset, d.batch // world, cfg.train.seed, rank, world)
    from ddaebm.data.images import ImageStream

    gpu = None if device is None else (device.index or 0) if device.type == "cuda" else -1
    return ImageStream(**image_stream_args(cfg), batch=d.batch // world, flip=d.flip, seed=cfg.train.seed,
                       rank=rank, world=world, device=gpu)
