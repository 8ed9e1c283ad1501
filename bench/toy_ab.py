"""Toy training step of this checkout against an earlier revision, in one process, iterations alternating.

    python bench/toy_ab.py REV [key=value ...] [--config configs/toy/25gaussians.yaml] [--iters 1500]
                           [--reference-math]

On a shared machine a toy iteration drifts by several ms over minutes (README "Benchmarks"), more than most
changes are worth, so timing two versions one after the other compares two machine states. Here both versions
train side by side in one process: REV's `ddaebm` package is exported with `git archive` into a temporary folder
and imported under another name (`ddaebm_ref`), each builds its trainer from the same config, and their
`train_step` calls alternate, so any drift hits both alike. Each also evicts the other's data from the cache, so
both run slower than alone: the figure to read is the difference.
"""

from __future__ import annotations

import argparse
import importlib
import io
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.toy_step import REFERENCE_MATH  # noqa: E402  (the overrides its first rows time)
_IMPORTS = re.compile(r"\b(from|import)(\s+)ddaebm\b")


def export_as(rev: str, name: str, into: Path) -> None:
    """REV's ddaebm/ package as `into/name`, its own imports of itself renamed to `name`."""
    try:
        tar = subprocess.run(["git", "archive", "--format=tar", rev, "ddaebm"], cwd=ROOT, capture_output=True,
                             check=True).stdout
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"git archive {rev}: {e.stderr.decode().strip()}") from None
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        for member in archive.getmembers():
            if not member.isfile():
                continue
            target = into / name / Path(member.name).relative_to("ddaebm")
            target.parent.mkdir(parents=True, exist_ok=True)
            data = archive.extractfile(member).read()
            if member.name.endswith(".py"):
                data = _IMPORTS.sub(rf"\1\2{name}", data.decode()).encode()
            target.write_bytes(data)


def trainer_of(package: str, config: str, overrides: list[str]):
    load_config = importlib.import_module(f"{package}.config").load_config
    trainer_cls = importlib.import_module(f"{package}.training.trainer").Trainer
    return trainer_cls(load_config(config, overrides))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rev", help="the git revision to compare this checkout against (e.g. HEAD~3, a commit)")
    p.add_argument("overrides", nargs="*", help="config overrides for both, e.g. model.hidden=8 data.batch=4")
    p.add_argument("--config", default=str(ROOT / "configs/toy/25gaussians.yaml"))
    p.add_argument("--iters", type=int, default=1500, help="timed iterations of each")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reference-math", action="store_true",
                   help=f"time the reference's math, as bench/toy_step.py's first rows do ({' '.join(REFERENCE_MATH)})")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    overrides = (REFERENCE_MATH if args.reference_math else []) + args.overrides
    with tempfile.TemporaryDirectory() as tmp:
        export_as(args.rev, "ddaebm_ref", Path(tmp))
        sys.path.insert(0, tmp)
        trainers = {args.rev: trainer_of("ddaebm_ref", args.config, overrides),
                    "this checkout": trainer_of("ddaebm", args.config, overrides)}
        for _ in range(args.warmup):
            for t in trainers.values():
                t.train_step()
        times = {name: [] for name in trainers}
        order = list(trainers.items())
        for i in range(args.iters):
            for name, t in order if i % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                t.train_step()
                times[name].append(time.perf_counter() - start)
    (ref_name, ref), (new_name, new) = ((name, sorted(ts)) for name, ts in times.items())
    med = {name: 1e3 * statistics.median(ts) for name, ts in ((ref_name, ref), (new_name, new))}
    p10 = {name: 1e3 * ts[len(ts) // 10] for name, ts in ((ref_name, ref), (new_name, new))}
    print(f"config         {args.config} {' '.join(overrides)}".rstrip() + f", {args.iters} alternating iterations "
          f"each, threads {args.threads}")
    for name in (ref_name, new_name):
        print(f"{name:14s} {med[name]:6.2f} ms/it (median)   {p10[name]:6.2f} ms/it (10th percentile)")
    diff = med[new_name] - med[ref_name]
    print(f"difference     {diff:+.2f} ms/it ({100 * diff / med[ref_name]:+.1f}%), "
          f"10th percentile {p10[new_name] - p10[ref_name]:+.2f} ms/it")


if __name__ == "__main__":
    main()
