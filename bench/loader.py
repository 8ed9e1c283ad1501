"""Image loader throughput: images/s of DALI on the CPU vs webdataset/PIL, at 32², 64² and 128².

    python bench/loader.py [--seconds 2] [--threads 2] [--batch 64] [--images 1024]

Shards of smooth random images (PNG and JPEG, stored at the training resolution; plus LSUN's case, JPEGs with a
256 shorter side resized and centre-cropped to 128) are written to a temp dir. Each case decodes, flips and
normalises to [−1, 1] NCHW float32 batches on `threads` threads/workers for `seconds` after two warm-up
batches. Loaders:

- `stream-dali`: ddaebm's ImageStream(loader='dali'): global order fed by external_source, DALI CPU decode;
- `stream-pil`:  ddaebm's ImageStream(loader='pil'): the same order, PIL in DataLoader worker processes;
- `dali-reader`: DALI's own fn.readers.webdataset (buffer shuffle, no cross-world resume) for reference;
- `wds-pil`:     the webdataset library + PIL in a DataLoader, the usual baseline.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_shards.writer import Record, write_split  # noqa: E402
from ddaebm.data.images import ImageStream  # noqa: E402

CASES = [(32, "png", 32), (32, "jpg", 32), (64, "png", 64), (64, "jpg", 64), (128, "png", 128), (128, "jpg", 128),
         (128, "jpg", 256)]  # (training resolution, format, stored shorter side)


def smooth_image(rng, h: int, w: int) -> Image.Image:
    small = Image.fromarray(rng.integers(0, 256, (max(4, h // 4), max(4, w // 4), 3), dtype=np.uint8))
    return small.resize((w, h), Image.BICUBIC).filter(ImageFilter.GaussianBlur(1))


def write_case(root: Path, name: str, fmt: str, side: int, n: int) -> None:
    rng = np.random.default_rng(0)
    recs = []
    for i in range(n):
        h, w = (side, side) if side <= 128 else (side, side * 4 // 3 + i % 3)
        buf = io.BytesIO()
        smooth_image(rng, h, w).save(buf, format="PNG" if fmt == "png" else "JPEG", quality=90)
        recs.append(Record(buf.getvalue(), fmt, i % 10))
    write_split(recs, root, name, "train", {"kind": "bench"}, None, shard_size=256)


def images_per_s(next_batch, batch: int, seconds: float) -> float:
    for _ in range(2):
        next_batch()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        next_batch()
        n += batch
    return n / (time.perf_counter() - t0)


def stream_case(root, name, res, loader, threads, batch, seconds) -> float:
    s = ImageStream(root, name, "train", batch=batch, resolution=res, flip=True, loader=loader, workers=threads)
    try:
        return images_per_s(s.next_batch, batch, seconds)
    finally:
        s.close()


def dali_reader_case(root: Path, name, res, fmt, resize, threads, batch, seconds) -> float:
    from nvidia.dali import Pipeline, fn, types
    from nvidia.dali.plugin.pytorch import feed_ndarray

    tars = sorted(str(p) for p in root.glob(f"{name}-train-*.tar"))
    pipe = Pipeline(batch_size=batch, num_threads=threads, device_id=None, seed=0)
    with pipe:
        jpegs = fn.readers.webdataset(paths=tars, index_paths=[t[:-4] + ".idx" for t in tars], ext=[fmt],
                                      random_shuffle=True, initial_fill=512, name="Reader")
        x = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        crop = {}
        if resize:
            x = fn.resize(x, resize_shorter=res, antialias=True, subpixel_scale=False)
            crop = {"crop": (res, res)}
        x = fn.crop_mirror_normalize(x, mirror=fn.random.coin_flip(), mean=127.5, std=127.5, dtype=types.FLOAT,
                                     output_layout="CHW", **crop)
        pipe.set_outputs(x)
    pipe.build()

    def next_batch():
        (out,) = pipe.run()
        out = out.as_tensor()
        return feed_ndarray(out, torch.empty(out.shape(), dtype=torch.float32))

    return images_per_s(next_batch, batch, seconds)


def _wds_sample(sample, fmt, res):
    im = Image.open(io.BytesIO(sample[fmt])).convert("RGB")
    w, h = im.size
    if (w, h) != (res, res):
        size = (res, int(h * res / w + 0.5)) if w <= h else (int(w * res / h + 0.5), res)
        left, top = (size[0] - res + 1) // 2, (size[1] - res + 1) // 2
        im = im.resize(size, Image.BILINEAR).crop((left, top, left + res, top + res))
    if np.random.random() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    return (torch.from_numpy(np.asarray(im).transpose(2, 0, 1).copy()).float() - 127.5) / 127.5


def wds_pil_case(root: Path, name, res, fmt, threads, batch, seconds) -> float:
    from functools import partial

    import webdataset as wds

    tars = sorted(str(p) for p in root.glob(f"{name}-train-*.tar"))
    ds = wds.WebDataset(tars, resampled=True, shardshuffle=False).shuffle(256).map(
        partial(_wds_sample, fmt=fmt, res=res))
    it = iter(torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=threads))
    try:
        return images_per_s(lambda: next(it), batch, seconds)
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown:
            shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--images", type=int, default=1024)
    a = p.parse_args()
    torch.set_num_threads(1)
    print(f"CPUs {os.cpu_count()}, threads/workers {a.threads}, batch {a.batch}, {a.seconds:.0f} s per case; "
          f"images/s (higher is better)")
    print(f"{'case':<22}{'stream-dali':>12}{'stream-pil':>12}{'dali-reader':>12}{'wds-pil':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for res, fmt, side in CASES:
            name = f"b{res}{fmt}{side}"
            write_case(root, name, fmt, side, a.images if side <= 128 else a.images // 4)
            rates = [stream_case(root, name, res, lo, a.threads, a.batch, a.seconds) for lo in ("dali", "pil")]
            rates.append(dali_reader_case(root, name, res, fmt, side != res, a.threads, a.batch, a.seconds))
            rates.append(wds_pil_case(root, name, res, fmt, a.threads, a.batch, a.seconds))
            label = f"{res}² {fmt}" + (f" from {side}" if side != res else "")
            print(f"{label:<22}" + "".join(f"{r:>12,.0f}" for r in rates), flush=True)


if __name__ == "__main__":
    main()
