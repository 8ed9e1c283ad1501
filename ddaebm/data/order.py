"""The sample order both loaders follow (method.md §8 preprocessing), and the counter-based noise that goes with it.

Epoch e of a split of N samples is a permutation of range(N) and a flip bit per position, both drawn from
`numpy.random.default_rng([seed, e])`. Global batches are consecutive slices of W·n positions of that permutation;
a last partial global batch is dropped (so every rank gets the same number of batches); rank r of W takes rows
r·n:(r+1)·n. A place in the order is therefore (epoch, offset into the permutation), the same numbers on every rank
and for every world size, which is what makes the stream resumable at any world size (ddaebm/data/images.py).
MNIST's dequantisation noise is a function of (seed, epoch, position) for the same reason.

Pure index and seed arithmetic: no decoding, no I/O.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np
import torch


class Planned(NamedTuple):
    """One rank batch of the plan: which samples, flipped or not, at which (epoch, position) of the order."""

    epoch: int
    offset: int
    indices: np.ndarray
    flips: np.ndarray
    positions: np.ndarray


def epoch_order(seed: int, epoch: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The permutation of epoch `epoch` and a flip bit per position."""
    rng = np.random.default_rng([seed, epoch])
    return rng.permutation(n), rng.random(n) < 0.5


def training_plan(n: int, batch: int, rank: int, world: int, seed: int, flip: bool, epoch: int,
                  offset: int) -> Iterator[Planned]:
    """Endless rank batches from (epoch, offset) on; a global batch that would run past the end starts the next
    epoch (the remainder of each epoch is dropped)."""
    global_batch, order = batch * world, None
    while True:
        if offset + global_batch > n:
            epoch, offset = epoch + 1, 0
        if order is None or order[0] != epoch:
            order = (epoch, *epoch_order(seed, epoch, n))
        pos = np.arange(offset + rank * batch, offset + (rank + 1) * batch)
        flips = order[2][pos] if flip else np.zeros(batch, bool)
        yield Planned(epoch, offset, order[1][pos], flips, pos)
        offset += global_batch


def split_plan(n: int, batch: int, rank: int, world: int) -> Iterator[Planned]:
    """Rank r's contiguous part [N·r/W, N·(r+1)/W) in order, unflipped, in batches (the last may be short)."""
    start, stop = n * rank // world, n * (rank + 1) // world
    for lo in range(start, stop, batch):
        pos = np.arange(lo, min(lo + batch, stop))
        yield Planned(0, lo, pos, np.zeros(len(pos), bool), pos)


def replacement_rows(bad: list[int], n: int) -> dict[int, int]:
    """For `on_error="skip"`: each bad row is filled by the next good row (cyclically) of the same batch."""
    bad_set = set(bad)
    if len(bad_set) >= n:
        raise RuntimeError(f"every one of the {n} samples of a batch failed to decode")
    out = {}
    for b in bad:
        j = (b + 1) % n
        while j in bad_set:
            j = (j + 1) % n
        out[b] = j
    return out


_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def dequant_noise(seed: int, epoch: int, positions, dim: int) -> torch.Tensor:
    """(U − ½)/256 per pixel (method.md §7.5). U is counter-based (SplitMix64 of (seed, epoch, position, pixel)), so
    it belongs to the sample's place in the order: resumable at any world size, ~25x cheaper than a generator
    per sample, and independent of numpy's generator streams."""
    key = np.zeros(1, np.uint64)
    for word in (seed, epoch):
        key = _mix64(key ^ _mix64(np.array([word], np.uint64) + _GAMMA))
    idx = np.asarray(positions, np.uint64)[:, None] * np.uint64(dim) + np.arange(dim, dtype=np.uint64)
    bits = _mix64(key + (idx + np.uint64(1)) * _GAMMA)
    u = (bits >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24)
    return (torch.from_numpy(u) - 0.5) / 256.0
