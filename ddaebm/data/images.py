"""Image batches from shards: the endless training stream (`ImageStream`) and one pass over a split (`iterate_split`).

This module owns the stream: choosing a loader (ddaebm/data/pil.py or ddaebm/data/dali.py), its position and
resume, and the decode-error policy. The order itself (a permutation and flips per (seed, epoch); rank r takes rows
r·n:(r+1)·n of each global batch of W·n) is ddaebm/data/order.py; the per-image transform is ddaebm/data/decode.py.
The stream's position is (epoch, offset into the permutation), the same numbers on every rank and for every world
size, and it is all `state_dict()` holds:

- **resume** = continue at the first global batch not yet consumed when the state was saved. At the same global
  batch it reproduces the uninterrupted sequence exactly, on any world size (a rank's rows are a slice of a
  global batch that does not depend on W), for `pil` and `dali` alike (DALI is fed this same order by
  `fn.external_source`, see dali.py). Batches prefetched but not consumed are re-read, never skipped. With a
  different global batch the stream continues at the same sample offset of the same epoch.
- Flips and MNIST's dequantisation noise are functions of (seed, epoch, position), so they resume too.

Decode errors are counted in `decode_errors` (part of the state). `on_error="raise"` stops with the shard and key;
`"skip"` warns with them and fills the row with the next good row of the same rank batch (shapes stay fixed, the
order stays deterministic).
"""

from __future__ import annotations

import warnings
from typing import Iterator

import numpy as np
import torch

from ddaebm.data.decode import Transform, logit_pixels, make_transform
from ddaebm.data.order import Planned, dequant_noise, replacement_rows, split_plan, training_plan
from ddaebm.data.pil import PilBatches
from ddaebm.data.shards import ShardSet, manifest_path
from ddaebm.errors import BadValue

LOADERS = ("auto", "dali", "pil")
ON_ERROR = ("raise", "skip")


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_loader(loader: str) -> str:
    """`auto`: DALI when importable (GPU `mixed` decoding when CUDA is present; on CPU DALI's threads still beat
    PIL workers, see bench/loader.py), else PIL."""
    if loader not in LOADERS:
        raise BadValue(f"loader={loader!r}; choose one of {LOADERS}")
    if loader == "dali" and not dali_available():
        raise ImportError("loader='dali' needs nvidia-dali (pip install nvidia-dali-cuda120); or use loader='pil'")
    if loader == "auto":
        return "dali" if dali_available() else "pil"
    return loader


def open_batches(loader: str, shards: ShardSet, t: Transform, plan: Iterator[Planned], batch: int, workers: int,
                 device: int | None, on_error: str):
    """The batches of `plan` decoded by the named loader ('pil' or 'dali')."""
    if loader == "pil":
        return PilBatches(shards, t, plan, workers, device)
    from ddaebm.data.dali import DaliBatches

    return DaliBatches(shards, t, plan, workers, device, batch, skip=on_error == "skip")


def _check_common(shards: ShardSet, batch: int, rank: int, world: int, on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise BadValue(f"on_error={on_error!r}; choose one of {ON_ERROR}")
    if batch < 1:
        raise BadValue(f"batch per rank is {batch}; it must be at least 1")
    if not 0 <= rank < world:
        raise BadValue(f"rank {rank} is outside world size {world}")
    if shards.num_samples == 0:
        raise BadValue(f"{manifest_path(shards.root, shards.name, shards.split)} lists no samples")


class _ErrorPolicy:
    """Counts decode errors; raises on the first (`raise`) or warns and fills the row (`skip`)."""

    def __init__(self, on_error: str):
        self.on_error, self.count = on_error, 0

    def apply(self, images: torch.Tensor, errors: list, filled: bool = False) -> torch.Tensor:
        if not errors:
            return images
        self.count += len(errors)
        if self.on_error == "raise":
            raise RuntimeError(f"undecodable sample {errors[0][1]} ({len(errors)} in this batch; "
                               f"on_error='skip' counts and fills them instead)")
        for _, msg in errors:
            warnings.warn(f"skipped undecodable sample {msg} (decode errors so far: {self.count})", stacklevel=3)
        if not filled:
            for bad, good in replacement_rows([k for k, _ in errors], len(images)).items():
                images[bad] = images[good]
        return images


class ImageStream:
    """Endless training batches of one split (see the module docstring for order, resume and errors).

    `batch` is per rank; the global batch is batch·world. `loader`: 'pil', 'dali' (GPU `mixed` decode when
    CUDA is available, else DALI on CPU) or 'auto'. `device`: the training GPU's index (−1: training on the CPU;
    None: DALI takes torch's current device when CUDA is available, PIL the CPU). Batches come back as float32
    [batch, *data_shape] on that GPU (DALI decodes there; PIL's uint8 batches are pinned, copied and converted
    there), else on the CPU.
    """

    def __init__(self, root, name: str, split: str, batch: int, resolution: int, channels: int = 3,
                 flip: bool = False, preprocess: str = "minus_one_one", seed: int = 0, rank: int = 0, world: int = 1,
                 loader: str = "auto", workers: int = 2, on_error: str = "raise", device: int | None = None,
                 verify: bool = False):
        self.shards = ShardSet(root, name, split)
        _check_common(self.shards, batch, rank, world, on_error)
        if batch * world > self.num_samples:
            raise BadValue(f"global batch {batch}x{world}={batch * world} exceeds the {self.num_samples} samples "
                             f"of {manifest_path(root, name, split)}")
        if seed < 0:
            raise BadValue(f"seed={seed}; the data order needs a non-negative seed")
        if verify and (problems := self.shards.verify()):
            raise BadValue("; ".join(problems))
        self.t = make_transform(self.shards.manifest, resolution, channels, preprocess)
        self.batch, self.rank, self.world, self.flip, self.seed = batch, rank, world, flip, seed
        self.loader, self.workers, self.device = resolve_loader(loader), workers, device
        self.errors = _ErrorPolicy(on_error)
        self.epoch, self.offset = 0, 0
        self._batches = self._plan = None

    @property
    def data_shape(self) -> tuple:
        c, r, _ = self.t.shape
        return (c * r * r,) if self.t.preprocess == "logit" else self.t.shape

    @property
    def num_samples(self) -> int:
        return self.shards.num_samples

    @property
    def decode_errors(self) -> int:
        return self.errors.count

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // (self.batch * self.world)

    def _open(self) -> None:
        args = (self.num_samples, self.batch, self.rank, self.world, self.seed, self.flip, self.epoch, self.offset)
        self._plan = training_plan(*args)
        self._batches = open_batches(self.loader, self.shards, self.t, training_plan(*args), self.batch,
                                     self.workers, self.device, self.errors.on_error)

    def next_batch(self) -> torch.Tensor:
        """This rank's rows of the next global batch."""
        if self._batches is None:
            self._open()
        planned = next(self._plan)
        images, errors = next(self._batches)
        images = self.errors.apply(images, errors, filled=self.loader == "dali")
        self.epoch, self.offset = planned.epoch, planned.offset + self.batch * self.world
        if self.t.preprocess == "logit":
            images = logit_pixels(images, dequant_noise(self.seed, planned.epoch, planned.positions,
                                                        images[0].numel()).to(images.device))
        return images

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "num_samples": self.num_samples,
                "global_batch": self.batch * self.world, "decode_errors": self.errors.count}

    def load_state_dict(self, state: dict) -> None:
        """Continue at the saved position; refuses a state from another seed or another set of samples, which
        would silently change the order."""
        for key, mine in (("seed", self.seed), ("num_samples", self.num_samples)):
            if state[key] != mine:
                raise BadValue(f"data state has {key}={state[key]}, this stream {key}={mine} "
                                 f"({manifest_path(self.shards.root, self.shards.name, self.shards.split)})")
        self.close()
        self.epoch, self.offset, self.errors.count = state["epoch"], state["offset"], state["decode_errors"]

    def close(self) -> None:
        if self._batches is not None:
            self._batches.close()
        self._batches = self._plan = None


def iterate_split(root, name: str, split: str, batch: int, resolution: int, channels: int = 3,
                  preprocess: str = "minus_one_one", loader: str = "auto", workers: int = 2, on_error: str = "raise",
                  rank: int = 0, world: int = 1, seed: int = 0, device: int | None = None):
    """(images, labels) over rank r's contiguous part of a split, each sample exactly once, in stored order, no
    flip (FID reference statistics, OOD sets, test log-likelihood). Labels are int64, −1 where a sample has none;
    with preprocess='logit' the dequantisation noise is fixed by (seed, sample index)."""
    shards = ShardSet(root, name, split)
    _check_common(shards, batch, rank, world, on_error)
    n = shards.num_samples
    if n * (rank + 1) // world == n * rank // world:
        raise BadValue(f"{manifest_path(root, name, split)}: {n} samples leave rank {rank} of {world} no data")
    t = make_transform(shards.manifest, resolution, channels, preprocess)
    return _split_batches(shards, t, resolve_loader(loader), batch, rank, world, workers, on_error, seed, device)


def _split_batches(shards: ShardSet, t: Transform, loader: str, batch: int, rank: int, world: int, workers: int,
                   on_error: str, seed: int, device: int | None):
    plan = split_plan(shards.num_samples, batch, rank, world)
    batches = open_batches(loader, shards, t, split_plan(shards.num_samples, batch, rank, world), batch, workers,
                           device, on_error)
    errors = _ErrorPolicy(on_error)
    try:
        for planned, (images, errs) in zip(plan, batches):
            images = errors.apply(images, errs, filled=loader == "dali")
            if t.preprocess == "logit":
                images = logit_pixels(images, dequant_noise(seed, 0, planned.positions, images[0].numel()))
            yield images, torch.from_numpy(shards.labels(planned.indices))
    finally:
        batches.close()
        shards.close()


def load_labels(root, name: str, split: str) -> np.ndarray:
    """Every label of a split in stored order (int64, −1 where missing)."""
    shards = ShardSet(root, name, split)
    try:
        return shards.labels()
    finally:
        shards.close()
