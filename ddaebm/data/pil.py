"""The PIL loader: planned batches decoded by `decode_pil` in torch DataLoader worker processes."""

from __future__ import annotations

import gc
import signal
from functools import partial
from typing import Iterator

import numpy as np
import torch

from ddaebm.data.decode import Transform, decode_pil, normalize
from ddaebm.data.order import Planned
from ddaebm.data.shards import ShardSet
from ddaebm.training.preemption import STOP_SIGNALS


class _Decoded(torch.utils.data.Dataset):
    """A map-style view for torch's DataLoader: item (sample index, flip) -> (uint8 image or None, error)."""

    def __init__(self, shards: ShardSet, t: Transform):
        self.shards, self.t = shards, t

    def __getitem__(self, item):
        i, flip = item
        try:
            return decode_pil(self.shards.image_bytes(i), self.t, flip), None
        except Exception as e:  # noqa: BLE001 - reported with its key, counted by the stream
            return None, f"{self.shards.where(i)}: {type(e).__name__}: {e}"


def _collate(rows, shape):
    images = np.zeros((len(rows), *shape), np.uint8)
    errors = []
    for k, (a, err) in enumerate(rows):
        if err is None:
            images[k] = a
        else:
            errors.append((k, err))
    return torch.from_numpy(images), errors


def _worker_init(_):
    """A forked decoding worker: one thread, deaf to the stop signals, and never collect what it inherited.

    The parent may hold NVIDIA DALI pipelines (or their garbage); a cyclic collection in the worker would run
    their finalizers, which wait on DALI threads that do not exist after fork, and the worker hangs forever
    (seen in a test: a PIL plugin import triggered the collection). Frozen objects are never collected.

    SLURM's preemption, `timeout` and a `kill` of the process group deliver the trainer's stop signals to the
    workers too; a worker killed by one makes the DataLoader raise in the trainer before it can checkpoint. The
    workers ignore them and end when the trainer shuts them down.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    gc.freeze()
    torch.set_num_threads(1)


class PilBatches:
    """(normalised float32 batch, [(row, error)]) for each planned batch: PIL decoding in `workers` DataLoader
    processes (0: in this process). Rows that failed are zeros here; the stream fills or raises.

    `gpu` (a CUDA device index): the uint8 batch is pinned by the DataLoader, copied without blocking, and
    converted to float on that GPU (a quarter of the bytes over the bus, and no float pass on the CPU); None or
    a negative index: on the CPU."""

    def __init__(self, shards: ShardSet, t: Transform, plan: Iterator[Planned], workers: int,
                 gpu: int | None = None):
        self.t = t
        self.device = torch.device("cuda", gpu) if gpu is not None and gpu >= 0 else None
        sampler = ([(int(i), bool(f)) for i, f in zip(p.indices, p.flips)] for p in plan)
        if workers:
            from PIL import Image

            Image.init()  # import PIL's format plugins here, once, not in every forked worker
            gc.collect()  # and fork without garbage that a worker could finalise
        loader = torch.utils.data.DataLoader(
            _Decoded(shards, t), batch_sampler=sampler, num_workers=workers,
            collate_fn=partial(_collate, shape=t.shape), worker_init_fn=_worker_init if workers else None,
            prefetch_factor=2 if workers else None, pin_memory=self.device is not None,
            pin_memory_device=str(self.device) if self.device is not None else "")
        self.it = iter(loader)

    def __iter__(self):
        return self

    def __next__(self):
        images, errors = next(self.it)
        if self.device is not None:
            images = images.to(self.device, non_blocking=True)
        return normalize(images, self.t), errors

    def close(self) -> None:
        shutdown = getattr(self.it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self.it = None
