"""Image batches from shards: the endless training stream (`ImageStream`) and one pass over a split (`iterate_split`).

Order (both loaders, SPEC §8 preprocessing): epoch e of a split of N samples is a permutation of range(N) and a
flip bit per position, both drawn from `numpy.random.default_rng([seed, e])`. Global batches are consecutive
slices of W·n positions of that permutation; a last partial global batch is dropped (so every rank gets the same
number of batches); rank r of W takes rows r·n:(r+1)·n. The stream's position is therefore (epoch, offset into the
permutation), the same numbers on every rank and for every world size, and it is all `state_dict()` holds:

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

import gc
import io
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Iterator, NamedTuple

import numpy as np
import torch

from ddaebm.data.shards import ShardSet, manifest_path

PREPROCESS = ("minus_one_one", "logit")
LOADERS = ("auto", "dali", "pil")
ON_ERROR = ("raise", "skip")


@dataclass(frozen=True)
class Transform:
    """What both loaders do to an encoded image (SPEC §8): decode to `channels`, resize the shorter side to
    `resolution` and centre-crop when the stored size is not resolution², optional flip, normalise."""

    resolution: int
    channels: int
    resize: bool
    preprocess: str

    @property
    def mean_std(self) -> tuple[float, float]:
        """[−1, 1] images, or [0, 1] pixels that the logit path dequantises afterwards (SPEC §7.5)."""
        return (127.5, 127.5) if self.preprocess == "minus_one_one" else (0.0, 255.0)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.resolution, self.resolution)


def make_transform(manifest: dict, resolution: int, channels: int, preprocess: str) -> Transform:
    if preprocess not in PREPROCESS:
        raise ValueError(f"preprocess={preprocess!r}; choose one of {PREPROCESS}")
    if channels not in (1, 3):
        raise ValueError(f"channels={channels}; images have 1 (grayscale) or 3 (RGB)")
    image = manifest["image"]
    stored = (image.get("height"), image.get("width"))
    return Transform(resolution, channels, stored != (resolution, resolution), preprocess)


def resized_size(w: int, h: int, r: int) -> tuple[int, int]:
    """Size after resizing the shorter side to r, rounding the other half up as DALI's `resize_shorter` does."""
    return (r, int(h * r / w + 0.5)) if w <= h else (int(w * r / h + 0.5), r)


def crop_box(w: int, h: int, r: int) -> tuple[int, int, int, int]:
    """The centred r×r box; DALI's centre crop rounds an odd margin's start up."""
    left, top = (w - r + 1) // 2, (h - r + 1) // 2
    return left, top, left + r, top + r


def decode_pil(data: bytes, t: Transform, flip: bool) -> np.ndarray:
    """uint8 C×R×R. PIL's antialiased bilinear resize; DALI's linear antialiased resize differs by a level or two
    on natural images (measured in tests/test_image_data.py); without resize both paths are bit-identical."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("L" if t.channels == 1 else "RGB")
    r = t.resolution
    if t.resize:
        size = resized_size(*im.size, r)
        im = im.resize(size, Image.BILINEAR).crop(crop_box(*size, r))
    elif im.size != (r, r):
        raise ValueError(f"image is {im.size[0]}x{im.size[1]}, the manifest promised {r}x{r}")
    if flip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    a = np.asarray(im)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def normalize(x: torch.Tensor, t: Transform) -> torch.Tensor:
    """(x − mean) · (1/std) in float32, the arithmetic of DALI's `crop_mirror_normalize`."""
    mean, std = t.mean_std
    return (x.float() - mean) * np.float32(1.0 / std)


_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def dequant_noise(seed: int, epoch: int, positions, dim: int) -> torch.Tensor:
    """(U − ½)/256 per pixel (SPEC §7.5). U is counter-based (SplitMix64 of (seed, epoch, position, pixel)), so
    it belongs to the sample's place in the order: resumable at any world size, ~25x cheaper than a generator
    per sample, and independent of numpy's generator streams."""
    key = np.zeros(1, np.uint64)
    for word in (seed, epoch):
        key = _mix64(key ^ _mix64(np.array([word], np.uint64) + _GAMMA))
    idx = np.asarray(positions, np.uint64)[:, None] * np.uint64(dim) + np.arange(dim, dtype=np.uint64)
    bits = _mix64(key + (idx + np.uint64(1)) * _GAMMA)
    u = (bits >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24)
    return (torch.from_numpy(u) - 0.5) / 256.0


def logit_pixels(x01: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """NICE's input (SPEC §7.5): dequantise pixels in [0, 1], clamp to [1e-3, 1 − 1e-3], logit, flatten."""
    p = (x01.flatten(1) + noise.to(x01.device)).clamp(1e-3, 1 - 1e-3)
    return torch.log(p) - torch.log1p(-p)


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
    """A forked decoding worker: one thread, and never collect what it inherited from the parent.

    The parent may hold NVIDIA DALI pipelines (or their garbage); a cyclic collection in the worker would run
    their finalizers, which wait on DALI threads that do not exist after fork, and the worker hangs forever
    (seen in a test: a PIL plugin import triggered the collection). Frozen objects are never collected.
    """
    gc.freeze()
    torch.set_num_threads(1)


class PilBatches:
    """(normalised float32 batch, [(row, error)]) for each planned batch: PIL decoding in `workers` DataLoader
    processes (0: in this process). Rows that failed are zeros here; the stream fills or raises."""

    def __init__(self, shards: ShardSet, t: Transform, plan: Iterator[Planned], workers: int):
        self.t = t
        sampler = ([(int(i), bool(f)) for i, f in zip(p.indices, p.flips)] for p in plan)
        if workers:
            from PIL import Image

            Image.init()  # import PIL's format plugins here, once, not in every forked worker
            gc.collect()  # and fork without garbage that a worker could finalise
        loader = torch.utils.data.DataLoader(
            _Decoded(shards, t), batch_sampler=sampler, num_workers=workers,
            collate_fn=partial(_collate, shape=t.shape), worker_init_fn=_worker_init if workers else None,
            prefetch_factor=2 if workers else None)
        self.it = iter(loader)

    def __iter__(self):
        return self

    def __next__(self):
        images, errors = next(self.it)
        return normalize(images, self.t), errors

    def close(self) -> None:
        shutdown = getattr(self.it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self.it = None


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
        raise ValueError(f"loader={loader!r}; choose one of {LOADERS}")
    if loader == "dali" and not dali_available():
        raise ImportError("loader='dali' needs nvidia-dali (pip install nvidia-dali-cuda120); or use loader='pil'")
    if loader == "auto":
        return "dali" if dali_available() else "pil"
    return loader


def open_batches(loader: str, shards: ShardSet, t: Transform, plan: Iterator[Planned], batch: int, workers: int,
                 device: int | None, on_error: str):
    """The batches of `plan` decoded by the named loader ('pil' or 'dali')."""
    if loader == "pil":
        return PilBatches(shards, t, plan, workers)
    from ddaebm.data.dali import DaliBatches

    return DaliBatches(shards, t, plan, workers, device, batch, skip=on_error == "skip")


def _check_common(shards: ShardSet, batch: int, rank: int, world: int, on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r}; choose one of {ON_ERROR}")
    if batch < 1:
        raise ValueError(f"batch per rank is {batch}; it must be at least 1")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside world size {world}")
    if shards.num_samples == 0:
        raise ValueError(f"{manifest_path(shards.root, shards.name, shards.split)} lists no samples")


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
    CUDA is available, else DALI on CPU) or 'auto'. `device`: CUDA device index for DALI (default: torch's
    current device when CUDA is available). Batches come back as float32 [batch, *data_shape], on the DALI GPU
    when decoded there, else on the CPU.
    """

    def __init__(self, root, name: str, split: str, batch: int, resolution: int, channels: int = 3,
                 flip: bool = False, preprocess: str = "minus_one_one", seed: int = 0, rank: int = 0, world: int = 1,
                 loader: str = "auto", workers: int = 2, on_error: str = "raise", device: int | None = None,
                 verify: bool = False):
        self.shards = ShardSet(root, name, split)
        _check_common(self.shards, batch, rank, world, on_error)
        if batch * world > self.num_samples:
            raise ValueError(f"global batch {batch}x{world}={batch * world} exceeds the {self.num_samples} samples "
                             f"of {manifest_path(root, name, split)}")
        if seed < 0:
            raise ValueError(f"seed={seed}; the data order needs a non-negative seed")
        if verify and (problems := self.shards.verify()):
            raise ValueError("; ".join(problems))
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
                                                        images[0].numel()))
        return images

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "num_samples": self.num_samples,
                "global_batch": self.batch * self.world, "decode_errors": self.errors.count}

    def load_state_dict(self, state: dict) -> None:
        """Continue at the saved position; refuses a state from another seed or another set of samples, which
        would silently change the order."""
        for key, mine in (("seed", self.seed), ("num_samples", self.num_samples)):
            if state[key] != mine:
                raise ValueError(f"data state has {key}={state[key]}, this stream {key}={mine} "
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
        raise ValueError(f"{manifest_path(root, name, split)}: {n} samples leave rank {rank} of {world} no data")
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
