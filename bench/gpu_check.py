"""The GPU paths in one short run: DALI `mixed` decode against the PIL path, and CIFAR-10 training steps on the GPU
(torch backend fp32 and bf16 autocast, DeepSpeed bf16 on one rank) with images/s. Prints one JSON line per check.

    python bench/gpu_check.py [--batch 64] [--iters 10] [--out DIR]

Meant for a machine with one NVIDIA GPU, within a few minutes: every check has its own try block, so one failure
still leaves the others' figures. On a CPU-only machine it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS: list[dict] = []


def report(check: str, **fields) -> None:
    row = {"check": check, **fields}
    RESULTS.append(row)
    print(json.dumps(row), flush=True)


def jpeg_shards(folder: Path, count: int, size: int) -> Path:
    """`count` smooth random JPEGs of size² written as a shard set with data_shards' folder source."""
    import subprocess

    from PIL import Image

    src = folder / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        base = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(base).resize((size, size), Image.BILINEAR).save(src / f"{i:05d}.jpg", quality=90)
    out = folder / "shards"
    subprocess.run([sys.executable, "-m", "data_shards", "folder", "--input", str(src), "--out", str(out),
                    "--name", "gpu", "--split", "train"], check=True, capture_output=True)
    return out


def check_dali(folder: Path, batch: int, seconds: float = 5.0) -> None:
    from ddaebm.data.images import ImageStream

    shards = jpeg_shards(folder, 1024, 256)
    for res in (32, 128):
        rates, first = {}, {}
        for loader, device in (("dali", 0), ("pil", -1)):
            s = ImageStream(shards, "gpu", "train", batch, res, loader=loader, seed=0, device=device, workers=4)
            first[loader] = s.next_batch().float().cpu()
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                x = s.next_batch()
                n += x.shape[0]
            if x.is_cuda:
                torch.cuda.synchronize()
            rates[loader] = n / (time.perf_counter() - t0)
            s.close()
        diff = (first["dali"] - first["pil"]).abs() * 127.5
        report("dali_mixed_decode", resolution=res, batch=batch, dali_img_s=round(rates["dali"]),
               pil_img_s=round(rates["pil"]), max_abs_diff_levels=float(diff.max()),
               mean_abs_diff_levels=float(diff.mean()))


class RandomImages:
    def __init__(self, shape, batch, device):
        self.shape, self.batch, self.device = shape, batch, device

    def next_batch(self):
        return torch.rand((self.batch, *self.shape), device=self.device) * 2 - 1

    def state_dict(self):
        return {}


def check_training(backend: str, precision: str, batch: int, iters: int, extra=()) -> None:
    from ddaebm import distributed
    from ddaebm.config import load_config
    from ddaebm.training.trainer import Trainer

    cfg = load_config("configs/cifar10.yaml", [f"data.batch={batch}", f"dist.backend={backend}", "dist.zero_stage=0",
                                               f"dist.precision={precision}", "dist.device=cuda", *extra])
    if backend == "deepspeed":
        distributed.init(distributed.discover(), "deepspeed", 600)
    trainer = Trainer(cfg)
    trainer._stream = RandomImages(trainer.model.data_shape, batch, trainer.device)
    torch.cuda.reset_peak_memory_stats()
    stats = trainer.train_step()  # warm-up (cuDNN autotuning, allocator)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        stats = trainer.train_step()
    torch.cuda.synchronize()
    s = (time.perf_counter() - t0) / iters
    finite = all(bool(torch.isfinite(v).all()) for v in stats.values())
    report("train_step", backend=backend, precision=precision, batch=batch, s_per_it=round(s, 4),
           img_per_s=round(batch / s, 1), peak_mem_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2),
           losses_finite=finite, f_real=float(stats["f_real"]), r1=float(stats.get("r1", float("nan"))),
           extra=list(extra))
    del trainer
    torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default=os.environ.get("OUT"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check")
        return
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29533"}.items():
        os.environ.setdefault(key, value)
    report("device", name=torch.cuda.get_device_name(0), torch=torch.__version__, cuda=torch.version.cuda)
    checks = [("dali", lambda d: check_dali(d, args.batch)),
              ("torch_fp32", lambda d: check_training("torch", "fp32", args.batch, args.iters)),
              ("torch_bf16", lambda d: check_training("torch", "bf16", args.batch, args.iters)),
              ("torch_bf16_cl", lambda d: check_training("torch", "bf16", args.batch, args.iters,
                                                         ["model.channels_last=true"])),
              ("deepspeed_bf16", lambda d: check_training("deepspeed", "bf16", args.batch, args.iters))]
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in checks:
            try:
                fn(Path(tmp) / name if (Path(tmp) / name).mkdir() is None else None)
            except Exception as err:  # noqa: BLE001 - report and go on to the next check
                report(name, error=f"{type(err).__name__}: {err}", trace=traceback.format_exc()[-1500:])
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_check.json").write_text(json.dumps(RESULTS, indent=1))


if __name__ == "__main__":
    main()
