"""Distributed figures for the toy model: samples/s at 1 and 2 ranks, DeepSpeed vs torch overhead at 1 rank,
time from start to the first step, checkpoint save and load time.

Each configuration is a real `python -m ddaebm train` (or torchrun) run in a temp dir; figures come from its
stats.jsonl (log_every=1, so every row is one step) and wall-clock stamps. Run on an idle machine:

    python bench/distributed.py [--steps 300] [--hidden 300] [--batch 200] [--zero 0]

Targets (issue 3): 2 ranks ≥ 1.7x the samples/s of 1 rank; DeepSpeed ≤ 10% slower per step than torch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CFG = str(ROOT / "configs" / "toy" / "25gaussians.yaml")


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "ddaebm-torch-extensions"))
    return env


def run(run_dir: Path, steps: int, nproc: int, extra: list[str]) -> dict:
    """One training run; returns median s/step past warm-up, time to first step and total wall time."""
    args = ["train", CFG, "--run-dir", str(run_dir), "--steps", str(steps), "train.log_every=1",
            "train.snapshot_every=1000000", "train.eval_at_end=false", "train.threads=1", *extra]
    if nproc == 1:
        cmd = [sys.executable, "-m", "ddaebm", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m", "ddaebm", *args]
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stats, first = run_dir / "stats.jsonl", None
    size0 = stats.stat().st_size if stats.is_file() else 0  # a resumed run appends
    while proc.poll() is None:
        if first is None and stats.is_file() and stats.stat().st_size > size0:
            first = time.time() - t0
        time.sleep(0.01)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd}: {proc.stderr.read()[-2000:]}")
    rows = [json.loads(line) for line in stats.read_text()[size0:].splitlines()]
    per_step = statistics.median(r["sec_per_step"] for r in rows[len(rows) // 5:])
    return {"sec_per_step": per_step, "first_step_s": first, "wall_s": time.time() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--hidden", type=int, default=300)
    p.add_argument("--batch", type=int, default=200)
    p.add_argument("--zero", type=int, default=0)
    a = p.parse_args()
    model = [f"model.hidden={a.hidden}", f"data.batch={a.batch}"]
    ds = ["dist.backend=deepspeed", f"dist.zero_stage={a.zero}"]
    never, every = ["train.ckpt_every=1000000"], ["train.ckpt_every=1"]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        out["torch_1"] = run(tmp / "t1", a.steps, 1, model + never)
        out["ds_1"] = run(tmp / "d1", a.steps, 1, model + ds + never)
        out["ds_2"] = run(tmp / "d2", a.steps, 2, model + ds + never)
        # Save cost: the same run checkpointing every step, minus the plain step.
        out["ds_2_ckpt_every_step"] = run(tmp / "d2c", min(a.steps, 50), 2, model + ds + every)
        # Load cost: resuming d2c (its last checkpoint) against starting fresh, to the first step.
        out["ds_2_resume"] = run(tmp / "d2c", min(a.steps, 50) + 5, 2, model + ds + never)
    sps = {k: a.batch / v["sec_per_step"] for k, v in out.items()}
    report = {
        "samples_per_s": {"torch_1rank": sps["torch_1"], "deepspeed_1rank": sps["ds_1"], "deepspeed_2ranks": sps["ds_2"]},
        "speedup_2_over_1_ranks": sps["ds_2"] / sps["ds_1"],
        "deepspeed_overhead_per_step": out["ds_1"]["sec_per_step"] / out["torch_1"]["sec_per_step"] - 1,
        "first_step_s": {k: out[k]["first_step_s"] for k in ("torch_1", "ds_1", "ds_2")},
        "save_s_2ranks": out["ds_2_ckpt_every_step"]["sec_per_step"] - out["ds_2"]["sec_per_step"],
        # Resume (load) minus fresh start to the first step; a fresh start also plots reals.png, so this
        # understates the load by that plot (~0.5 s at toy size) and may come out negative at toy size.
        "resume_minus_fresh_first_step_s": out["ds_2_resume"]["first_step_s"] - out["ds_2"]["first_step_s"],
        "config": vars(a),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
