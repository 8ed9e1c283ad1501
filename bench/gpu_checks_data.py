"""Shards of one image format and the DALI stream's rates, for bench/gpu_checks.py's dali_formats check."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np

FORMATS = {"jpeg": ("JPEG", "jpg", {"quality": 90}), "webp": ("WEBP", "webp", {"quality": 90}),
           "png": ("PNG", "png", {})}


def format_shards(folder: Path, fmt: str, count: int, size: int) -> Path:
    """`count` smooth random images of size² in one format, as a shard set (data_shards' folder source)."""
    from PIL import Image

    name, ext, options = FORMATS[fmt]
    src = folder / "src"
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        base = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(base).resize((size, size), Image.BILINEAR).save(src / f"{i:05d}.{ext}", name, **options)
    out = folder / "shards"
    subprocess.run([sys.executable, "-m", "data_shards", "folder", "--input", str(src), "--out", str(out),
                    "--name", "gpu", "--split", "train"], check=True, capture_output=True)
    return out


def stream_rates(shards: Path, workers: int, ctx, make_trainer, seconds: float = 3.0) -> dict:
    """img/s of a DALI `mixed` stream alone, and while it feeds training steps of `make_trainer()`."""
    import torch

    from ddaebm.data.images import ImageStream

    t = make_trainer()
    batch = t.cfg.data.batch
    stream = ImageStream(shards, "gpu", "train", batch, 128, loader="dali", device=ctx.device.index or 0,
                         workers=workers, seed=0)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += stream.next_batch().shape[0]
    torch.cuda.synchronize()
    alone = n / (time.perf_counter() - t0)
    t._stream = stream
    t.train_step()
    torch.cuda.synchronize()
    t0, steps = time.perf_counter(), 5
    for _ in range(steps):
        t.train_step()
    torch.cuda.synchronize()
    fed = steps * batch / (time.perf_counter() - t0)
    stream.close()
    return {"stream_img_s": round(alone), "training_img_s": round(fed, 1)}
