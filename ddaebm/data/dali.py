"""NVIDIA DALI decoding for the image loaders: the same samples, order and flips as the PIL path.

Why `fn.external_source` and not `fn.readers.webdataset`: the reader shuffles through a bounded buffer
(`initial_fill`) within the shards of one rank, so its order depends on the number of ranks, and its checkpoint
(`Pipeline(enable_checkpointing=True)`, supported by the webdataset reader in DALI 2.4) only restores at the same
world size. Feeding encoded bytes from the global plan (ddaebm/data/order.py: one permutation per (seed, epoch),
rank r takes rows r·n:(r+1)·n of each global batch) keeps the PIL path's order exactly, so resume is exact at any
world size and both loaders are interchangeable mid-run. Reading the bytes (one `pread` per sample from the
index's offsets) is cheap next to decoding, which DALI does in its own threads: `device="mixed"` (nvJPEG/GPU)
when a CUDA device is given, else on the CPU.

The graph: external_source(bytes, flip) -> decoders.image -> [resize shorter side to R (antialiased linear,
subpixel_scale off, as PIL's bilinear) ->] crop_mirror_normalize(centre crop R², mirror=flip, (x − mean)/std,
CHW float32).
"""

from __future__ import annotations

from collections import deque
from itertools import chain
from typing import Iterator

import numpy as np
import torch

from ddaebm.data.decode import Transform, decode_pil
from ddaebm.data.order import Planned, replacement_rows
from ddaebm.data.shards import ShardSet


def cuda_device(device: int | None) -> int | None:
    """The CUDA device DALI decodes on: the given index, torch's current device when CUDA is available, or None
    (DALI on the CPU; also for a negative index)."""
    if device is not None and device < 0:
        return None
    if device is None:
        return torch.cuda.current_device() if torch.cuda.is_available() else None
    if not torch.cuda.is_available():
        raise RuntimeError(f"DALI device {device} requested but CUDA is not available; pass device=None or -1")
    return device


def header_problem(data: bytes) -> str | None:
    """Why DALI would refuse these bytes, judged from magic numbers alone (nanoseconds, unlike opening them with
    PIL, which halved throughput at 32²). Damage deeper inside is caught when DALI fails (see DaliBatches)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return None if data[12:16] == b"IHDR" else "PNG without its IHDR header"
    if data[:3] == b"\xff\xd8\xff" or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        return None
    return f"not a PNG, JPEG or WebP image (first bytes {data[:12]!r})"


def build_pipeline(source, t: Transform, batch: int, threads: int, device: int | None):
    from nvidia.dali import Pipeline, fn, types

    pipe = Pipeline(batch_size=batch, num_threads=max(1, threads), device_id=device, prefetch_queue_depth=2)
    with pipe:
        data, flips = fn.external_source(source=source, num_outputs=2, batch=True,
                                         dtype=[types.UINT8, types.INT32], ndim=[1, 0])
        images = fn.decoders.image(data, device="cpu" if device is None else "mixed",
                                   output_type=types.GRAY if t.channels == 1 else types.RGB)
        crop = {}
        if t.resize:
            images = fn.resize(images, resize_shorter=t.resolution, antialias=True, subpixel_scale=False,
                               interp_type=types.INTERP_LINEAR)
            crop = {"crop": (t.resolution, t.resolution)}
        mean, std = t.mean_std
        images = fn.crop_mirror_normalize(images, mirror=flips, mean=mean, std=std, dtype=types.FLOAT,
                                          output_layout="CHW", **crop)
        pipe.set_outputs(images)
    pipe.build()
    return pipe


class DaliBatches:
    """(normalised float32 batch, [(row, error)]) for each planned batch, decoded by DALI.

    An undecodable sample is reported with shard and key and its row is filled with the next good row's bytes and
    flip (what the PIL path does after decoding), so batches keep their shape; the stream counts it and raises or
    warns by its `on_error`. Garbage is caught from its magic number as it is fed; a sample that passes that
    check but fails inside DALI is found by decoding the failing batch with PIL, remembered as bad, and (with
    `skip`) the pipeline is rebuilt and replays the unconsumed batches, so the order is unchanged.
    """

    def __init__(self, shards: ShardSet, t: Transform, plan: Iterator[Planned], workers: int,
                 device: int | None, batch: int, skip: bool = False):
        self.shards, self.t, self.plan, self.skip = shards, t, plan, skip
        self.device, self.batch, self.workers = cuda_device(device), batch, workers
        self.bad: dict[int, str] = {}  # sample index -> why it cannot be decoded
        self.fed: deque = deque()  # planned batches handed to DALI and not yet returned
        self.pending: Iterator[Planned] = plan
        self.pipe = build_pipeline(self._feed, t, batch, workers, self.device)

    def _feed(self):
        planned = next(self.pending)  # StopIteration ends the pipeline's data
        data = [self.shards.image_bytes(int(i)) for i in planned.indices]
        flips = [bool(f) for f in planned.flips]
        for i, b in zip(planned.indices.tolist(), data):
            if i not in self.bad and (p := header_problem(b)) is not None:
                self.bad[i] = f"{self.shards.where(i)}: {p}"
        errors = [(k, self.bad[i]) for k, i in enumerate(planned.indices.tolist()) if i in self.bad]
        for bad, good in replacement_rows([k for k, _ in errors], len(data)).items():
            data[bad], flips[bad] = data[good], flips[good]
        self.fed.append((planned, errors))
        return [np.frombuffer(b, np.uint8) for b in data], [np.array(f, np.int32) for f in flips]

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            try:
                (images,) = self.pipe.run()
                break
            except StopIteration:
                raise
            except Exception as e:
                self._recover(e)
        _, errors = self.fed.popleft()
        return self._to_torch(images), errors

    def _recover(self, e: Exception) -> None:
        """After DALI failed on the oldest fed batch: name its samples that PIL cannot decode either; with `skip`
        mark them bad and rebuild the pipeline to replay the unconsumed batches, else raise."""
        if not self.fed:
            raise RuntimeError(f"DALI pipeline failed: {e}") from e
        planned, _ = self.fed[0]
        found = {}
        for i in planned.indices.tolist():
            try:
                decode_pil(self.shards.image_bytes(i), self.t, False)
            except Exception as err:  # noqa: BLE001 - collected for the message
                found[i] = f"{self.shards.where(i)}: {type(err).__name__}: {err}"
        if not found or not self.skip:
            named = list(found.values()) or "none found by PIL"
            raise RuntimeError(f"DALI could not decode a batch; undecodable: {named}; DALI said: {e}") from e
        self.bad.update(found)
        replay = [p for p, _ in self.fed]
        self.fed.clear()
        self.pending = chain(replay, self.plan)
        self.pipe = build_pipeline(self._feed, self.t, self.batch, self.workers, self.device)

    def _to_torch(self, images) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        images = images.as_tensor()  # dense: every sample is C×R×R
        shape = images.shape()
        if self.device is None:
            return feed_ndarray(images, torch.empty(shape, dtype=torch.float32))
        out = torch.empty(shape, dtype=torch.float32, device=torch.device("cuda", self.device))
        return feed_ndarray(images, out, cuda_stream=torch.cuda.current_stream(self.device))

    def close(self) -> None:
        self.pipe = None
        self.fed.clear()
