"""Fréchet Inception Distance (method.md §10): feature moments, reference statistics cached per shard set, the FD.

Ranks: under torchrun/srun (a process group is started by `ddaebm eval`), rank r of W generates the contiguous
block [N·r/W, N·(r+1)/W) of the sample indices 0..N−1, each from its own seed (`generate(..., indices=...)`), so
the set of images is the same on any number of ranks. Features never leave their rank: each rank keeps the
additive moments (n, Σx, Σxxᵀ) in float64 and one all-reduce sums them (k-diffusion gathers features; the sums
are 32 MiB whatever N). Reference statistics are computed the same way over the ranks' parts of the split. The
mean and covariance then follow on every rank; only rank 0 writes the cache file and the metric row.

Reference cache: `<cache>/<name>-<split>-<res>px-n<num>-<key hash>.npz` holding mu, sigma, num and the key as
JSON (dataset, split, resolution, channels, pixel path, feature extractor id, sample count, shard digest); the
file is written to a temporary name and renamed, so a reader never sees half of it. `--cache` picks the folder,
default `$XDG_CACHE_HOME/ddaebm/fid` (~/.cache/ddaebm/fid).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import scipy.linalg
import torch

from ddaebm import distributed
from ddaebm.errors import BadValue


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddaebm" / "fid"


# ---------------------------------------------------------------------------------------------- statistics


@dataclass
class FIDStats:
    mu: np.ndarray
    sigma: np.ndarray
    num: int


class Moments:
    """Running n, Σx and Σxxᵀ of feature rows, in float64 (additive over batches and ranks)."""

    def __init__(self, dim: int | None = None):
        self.n, self.s, self.ss = 0, None, None
        if dim is not None:
            self._init(dim)

    def _init(self, dim: int) -> None:
        self.s, self.ss = np.zeros(dim), np.zeros((dim, dim))

    def add(self, features: np.ndarray) -> None:
        x = np.asarray(features, dtype=np.float64)
        if self.s is None:
            self._init(x.shape[1])
        self.n += len(x)
        self.s += x.sum(0)
        self.ss += x.T @ x

    def reduce(self) -> "Moments":
        """Sum over ranks (a no-op without a process group); every rank must call it."""
        if distributed.world_size() > 1:
            n, self.s, self.ss = sum_over_ranks([np.array([float(self.n)]), self.s, self.ss])
            self.n = int(round(n[0]))
        return self

    def stats(self) -> FIDStats:
        if self.n < 2:
            raise ValueError(f"FID statistics need at least 2 images, got {self.n}")
        mu = self.s / self.n
        sigma = (self.ss - self.n * np.outer(mu, mu)) / (self.n - 1)
        return FIDStats(mu, (sigma + sigma.T) / 2, self.n)


def empty_moments(extractor) -> Moments:
    """Moments sized for the extractor's features when ranks will sum them (a rank may see no images)."""
    return Moments(extractor.dim) if distributed.world_size() > 1 else Moments()


def group_rank() -> int:
    """This process's rank in the process group (0 without one), consistent with distributed.world_size()."""
    return torch.distributed.get_rank() if distributed.is_initialized() else 0


def sum_over_ranks(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Element-wise sums over ranks in float64 (one all-reduce; on the GPU under NCCL)."""
    if distributed.world_size() == 1:
        return arrays
    device = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else "cpu"
    flat = torch.from_numpy(np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])).to(device)
    torch.distributed.all_reduce(flat)
    flat = flat.cpu().numpy()
    out, at = [], 0
    for a in arrays:
        out.append(flat[at:at + np.size(a)].reshape(np.shape(a)))
        at += np.size(a)
    return out


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2(Σ1Σ2)^½) in float64 (Heusel et al.).

    As pytorch-fid/TTUR: when sqrtm gives non-finite values (singular product, e.g. fewer images than feature
    dimensions) both covariances get eps·I added; a complex result whose imaginary diagonal exceeds 1e-3 is an
    error, smaller imaginary parts are numerical noise and dropped.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"FID statistics differ in shape: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # singular products (fewer images than dimensions) are expected, handled below
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(sigma1)) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: imaginary component {np.max(np.abs(covmean.imag)):.3g} in sqrtm(Σ1Σ2)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_stats(a: FIDStats, b: FIDStats) -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


# ---------------------------------------------------------------------------------------------- reference


def shard_digest(shards) -> str:
    """Identifies a shard set by its content (the manifest's shard hashes and sizes), not by its path."""
    m = shards.manifest
    text = json.dumps([m["num_samples"], [(s["sha256"], s["bytes"]) for s in m["shards"]]])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def reference_key(root, name: str, split: str, resolution: int, channels: int, extractor_id: str,
                  num: int | None) -> dict:
    """Everything reference statistics depend on; opening the shard set also checks that it exists."""
    from ddaebm.data.shards import ShardSet

    shards = ShardSet(root, name, split)
    try:
        total = shards.num_samples
        digest = shard_digest(shards)
    finally:
        shards.close()
    if num is not None and not 2 <= num <= total:
        raise BadValue(f"--ref-num {num}: {name}-{split} has {total} samples (need 2 ≤ num ≤ {total})")
    return {"dataset": name, "split": split, "resolution": resolution, "channels": channels,
            "pixels": "uint8, loader resize (shorter side, bilinear) + centre crop when sizes differ",
            "extractor": extractor_id, "num": num or total, "shards": digest}


def cache_path(cache_dir: Path, key: dict) -> Path:
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{key['dataset']}-{key['split']}-{key['resolution']}px-n{key['num']}-{h}.npz"


def save_stats(path: Path, stats: FIDStats, key: dict) -> None:
    from ddaebm.fsio import write_atomic_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, mu=stats.mu, sigma=stats.sigma, num=np.int64(stats.num), key=json.dumps(key, sort_keys=True))
    write_atomic_bytes(path, buf.getvalue())


def load_stats(path: Path) -> FIDStats:
    with np.load(path) as z:
        return FIDStats(z["mu"], z["sigma"], int(z["num"]))


def split_images(root, name: str, split: str, resolution: int, channels: int, batch: int, num: int | None = None,
                 loader: str = "pil", workers: int = 0) -> Iterator[np.ndarray]:
    """uint8 [B, H, W, C] batches of this rank's part of the first `num` (default: all) samples of a split.

    Ranks read their contiguous parts of the whole split and stop at position `num`, so with a limit far below the
    split's size the first ranks do the work (the reference is computed once and cached)."""
    from ddaebm.data.images import iterate_split
    from ddaebm.data.pixels import to_uint8
    from ddaebm.data.shards import ShardSet

    rank, world = group_rank(), distributed.world_size()
    shards = ShardSet(root, name, split)
    n = shards.num_samples
    shards.close()
    limit, at = num or n, n * rank // world
    batches = iterate_split(root, name, split, batch, resolution, channels, "minus_one_one", loader, workers,
                            rank=rank, world=world)
    try:
        for images, _ in batches:
            if at >= limit:
                break
            yield to_uint8(images[:limit - at], "minus_one_one")
            at += len(images)
    finally:
        batches.close()


def reference_stats(root, name: str, split: str, resolution: int, channels: int, extractor, num: int | None = None,
                    cache_dir: Path | None = None, batch: int = 256, loader: str = "pil",
                    workers: int = 0) -> tuple[FIDStats, Path, bool]:
    """(statistics, cache file, whether it was cached) of the first `num` (default: all) samples of a split."""
    key = reference_key(root, name, split, resolution, channels, extractor.id, num)
    path = cache_path(cache_dir or default_cache_dir(), key)
    (missing,) = sum_over_ranks([np.array([float(not path.is_file())])])  # all ranks must see it (node-local caches)
    if missing[0] == 0:
        return load_stats(path), path, True
    moments = empty_moments(extractor)
    for images in split_images(root, name, split, resolution, channels, batch, num, loader, workers):
        moments.add(extractor(images))
    stats = moments.reduce().stats()
    if group_rank() == 0:
        save_stats(path, stats, key)
    distributed.barrier()
    return stats, path, False


# ---------------------------------------------------------------------------------------------- samples


def rank_block(num: int) -> range:
    """This rank's contiguous block of sample indices [N·r/W, N·(r+1)/W)."""
    rank, world = group_rank(), distributed.world_size()
    return range(num * rank // world, num * (rank + 1) // world)


def generated_images(model, num: int, seed: int, batch: int, refine: bool = False,
                     use_ema: bool | None = None) -> Iterator[tuple[list[int], np.ndarray]]:
    """(indices, uint8 [B, H, W, C]) over this rank's block of samples 0..num−1, sample i from its own seed."""
    from ddaebm.data.pixels import to_uint8

    block = rank_block(num)
    for lo in range(block.start, block.stop, batch):
        idx = list(range(lo, min(lo + batch, block.stop)))
        x = model.generate(len(idx), seed, refine, use_ema=use_ema, indices=idx, batch=len(idx))
        yield idx, to_uint8(x, model.cfg.data.preprocess)


def fid_of_model(model, ref_stats: FIDStats, num: int, batch: int, seed: int = 0, extractor=None,
                 refine: bool = False, use_ema: bool | None = None) -> float:
    """FID of `num` samples of the model against `ref_stats`; all ranks call it (each generates its block) and
    all get the value; `model` is a ddaebm.model.Model. `extractor` defaults to the TF-Inception FID weights on
    the model's device (loading them takes a moment: pass one in for repeated in-loop use)."""
    from ddaebm.metrics.inception import FeatureExtractor

    extractor = extractor or FeatureExtractor(device=model.device)
    moments = empty_moments(extractor)
    with eval_mode(model):
        for _, images in generated_images(model, num, seed, batch, refine, use_ema):
            moments.add(extractor(images))
    return fid_from_stats(moments.reduce().stats(), ref_stats)


@contextlib.contextmanager
def eval_mode(model):
    """The model's networks in eval mode (no dropout) for the duration, the previous modes restored afterwards."""
    from ddaebm.sampling import bn_mode

    with contextlib.ExitStack() as stack:
        for m in {id(m): m for m in [*model.networks.values(), *model.sampling_networks(True)]}.values():
            stack.enter_context(bn_mode(m, False))
        yield model
