"""Training data streams: an endless sequence of batches whose position is part of the checkpoint."""

from __future__ import annotations

import torch

from ddaebm.config import DataConfig


class ToyStream:
    """A fresh batch of a 2-D toy distribution every iteration (SPEC §9: infinite data, no fixed set).

    Each rank seeds its own generator, so ranks draw different data; the generator state is the stream's
    position, so a resumed run continues the exact sequence.
    """

    data_shape = (2,)

    def __init__(self, dataset: str, batch: int, seed: int, rank: int = 0):
        from ddaebm.data.toy import TOY_DATASETS

        if dataset not in TOY_DATASETS:
            raise ValueError(f"data.dataset={dataset!r} is not a toy dataset ({', '.join(TOY_DATASETS)})")
        self.dataset, self.batch = dataset, batch
        self.rng = torch.Generator().manual_seed(seed * 1_000_003 + rank)

    def next_batch(self) -> torch.Tensor:
        from ddaebm.data.toy import sample_toy

        return sample_toy(self.dataset, self.batch, self.rng)

    def state_dict(self) -> dict:
        return {"rng": self.rng.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.set_state(state["rng"])


def build_stream(cfg: DataConfig, seed: int, rank: int = 0, world: int = 1) -> ToyStream:
    if cfg.batch % world:
        raise ValueError(f"data.batch={cfg.batch} does not divide over {world} ranks")
    return ToyStream(cfg.dataset, cfg.batch // world, seed, rank)
