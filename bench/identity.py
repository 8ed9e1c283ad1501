"""Are this checkout's training runs bit-identical to an earlier revision's? For refactors that must not change
the numbers.

    python bench/identity.py REV [--toy-steps 300] [--image-steps 6] [--keep DIR]

Trains the same fixed-seed runs with REV's `ddaebm` (exported with `git archive`, imported first on PYTHONPATH)
and with this checkout's, each through the command line in its own process: the default toy config
(25gaussians, fast path as configured) and the tiny CIFAR-10 config on StackedMNIST shards made from
../shared/data/mnist-10k (or $DDAEBM_SHARED/data/mnist-10k; NCSN++ networks, EMA, the PIL loader). Then compares every logged loss (stats.jsonl,
one row per step) and every tensor of the final checkpoint (both engines' weights and optimizer state, the
EMA), bit for bit. Prints one line per run and exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MNIST = Path(os.environ.get("DDAEBM_SHARED", ROOT.parent / "shared")) / "data" / "mnist-10k"


def export(rev: str, into: Path) -> Path:
    """REV's ddaebm/ package under `into` (to put first on PYTHONPATH)."""
    tar = subprocess.run(["git", "archive", "--format=tar", rev, "ddaebm"], cwd=ROOT, capture_output=True,
                         check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(into, filter="data")
    return into


def train(package_root: Path, run_dir: Path, args: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=str(package_root))
    r = subprocess.run([sys.executable, "-m", "ddaebm", "train", *args, "--run-dir", str(run_dir)], cwd=ROOT,
                       env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"training with {package_root} failed:\n{r.stderr[-3000:]}")


def tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor inside a nested checkpoint state, by its path (the config and counters are not tensors)."""
    if torch.is_tensor(obj):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    out = {}
    for key, value in items:
        out.update(tensors(value, f"{prefix}/{key}"))
    return out


def final_state(run_dir: Path) -> dict:
    root = run_dir / "checkpoints"
    name = (root / "latest").read_text().strip()
    return torch.load(root / name / "state.pt", map_location="cpu", weights_only=True)  # plain data, both formats


def compare(a: Path, b: Path) -> list[str]:
    """The differences between two run dirs' logged losses and final checkpoints; [] when bit-identical."""
    rows_a = [json.loads(line) for line in (a / "stats.jsonl").read_text().splitlines()]
    rows_b = [json.loads(line) for line in (b / "stats.jsonl").read_text().splitlines()]
    diffs = []
    skip = ("time", "sec", "rate", "mem", "wall")  # timings differ between any two runs
    for ra, rb in zip(rows_a, rows_b):
        for key in sorted(set(ra) | set(rb)):
            if not any(s in key for s in skip) and ra.get(key) != rb.get(key):
                diffs.append(f"stats step {ra.get('step')}: {key} {ra.get(key)!r} != {rb.get(key)!r}")
    if len(rows_a) != len(rows_b):
        diffs.append(f"stats.jsonl: {len(rows_a)} rows != {len(rows_b)}")
    ta, tb = tensors(final_state(a)), tensors(final_state(b))
    for key in sorted(set(ta) | set(tb)):
        if key not in ta or key not in tb:
            diffs.append(f"checkpoint {key}: only in {'the revision' if key in ta else 'this checkout'}")
        elif ta[key].dtype != tb[key].dtype or ta[key].shape != tb[key].shape or not torch.equal(ta[key], tb[key]):
            diffs.append(f"checkpoint {key}: differs")
    return diffs, len(rows_a), len(ta)


def stackedmnist_shards(out: Path) -> Path:
    r = subprocess.run([sys.executable, "-m", "data_shards", "stackedmnist", "--input", str(MNIST), "--out", str(out),
                        "--name", "stackedmnist", "--split", "train", "--num-samples", "64"], cwd=ROOT,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"data_shards failed:\n{r.stderr[-2000:]}")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rev")
    p.add_argument("--toy-steps", type=int, default=300)
    p.add_argument("--image-steps", type=int, default=6)
    p.add_argument("--keep", help="keep the run dirs here (default: a temporary folder)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.keep) if a.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        ref = export(a.rev, work / "ref")
        shards = stackedmnist_shards(work / "shards")
        runs = {
            "toy 25gaussians": ["configs/toy/25gaussians.yaml", "--steps", str(a.toy_steps), "train.log_every=1",
                                f"train.ckpt_every={a.toy_steps}", "train.eval_at_end=false",
                                "train.snapshot_every=100000"],
            "tiny cifar10 (StackedMNIST)": ["configs/tiny/cifar10.yaml", "--steps", str(a.image_steps),
                                            "data.dataset=stackedmnist", f"data.root={shards}", "data.loader=pil",
                                            "train.log_every=1", f"train.ckpt_every={a.image_steps}",
                                            "train.snapshot_every=100000", "train.threads=2"],
        }
        failed = False
        for i, (name, args) in enumerate(runs.items()):
            train(ref, work / f"ref-{i}", args)
            train(ROOT, work / f"new-{i}", args)
            diffs, rows, count = compare(work / f"ref-{i}", work / f"new-{i}")
            verdict = "bit-identical" if not diffs else f"{len(diffs)} differences"
            print(f"{name}: {rows} logged steps, {count} checkpoint tensors: {verdict} ({a.rev} vs this checkout)")
            for line in diffs[:20]:
                print("  " + line)
            failed |= bool(diffs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
