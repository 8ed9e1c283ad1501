"""Distributed figures for the toy model: samples/s at 1 and 2 ranks, DeepSpeed vs torch overhead at 1 rank,
time from start to the first step, checkpoint save and load time.

Each configuration is a real `python -m ddaebm train` (or torchrun) run in a temp dir; figures come from its
stats.jsonl (one row per 20 steps: the logged statistics are reduced over ranks at each row, so logging every step
would time one more collective per step than a run does) and wall-clock stamps. Run on an idle machine:

    python bench/distributed.py [--steps 300] [--hidden 300] [--batch 200] [--zero 0]

Targets (issue 3): 2 ranks ≥ 1.7x the samples/s of 1 rank; DeepSpeed ≤ 10% slower per step than torch.
Two ways to add a rank are timed: the same global batch split over 2 ranks (half the work per rank: strong
scaling), and the same batch per rank (twice the global batch: weak scaling, the usual data-parallel figure).
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
LOG_EVERY = 20


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "ddaebm-torch-extensions"))
    return env


def run(run_dir: Path, steps: int, nproc: int, extra: list[str]) -> dict:
    """One training run; returns median s/step past warm-up, time to first step and total wall time."""
    args = ["train", CFG, "--run-dir", str(run_dir), "--steps", str(steps), f"train.log_every={LOG_EVERY}",
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
    per_step = statistics.median(r["sec_per_step"] for r in (rows[1:] or rows))  # the first row holds the warm-up
    return {"sec_per_step": per_step, "first_step_s": first, "wall_s": time.time() - t0}


def interleaved_worker(steps: int, hidden: int, batch: int, zero: int) -> dict:
    """In one process: a torch-backend and a DeepSpeed-backend trainer (1 rank) stepping alternately, so both
    see the same memory, caches and machine load; the per-step overhead without the ~5-10% that separate
    processes differ by here."""
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    sys.path.insert(0, str(ROOT))
    import torch

    from ddaebm import distributed
    from ddaebm.config import load_config
    from ddaebm.training.trainer import Trainer

    torch.set_num_threads(1)
    base = [f"model.hidden={hidden}", f"data.batch={batch}"]
    distributed.init(distributed.discover(), "deepspeed", 300)
    trainers = {"torch": Trainer(load_config(CFG, base)),
                "deepspeed": Trainer(load_config(CFG, base + ["dist.backend=deepspeed", f"dist.zero_stage={zero}"]))}
    times: dict[str, list[float]] = {k: [] for k in trainers}
    for i in range(steps + steps // 4):
        for name, trainer in trainers.items():
            t0 = time.perf_counter()
            trainer.train_step()
            if i >= steps // 4:  # warm-up
                times[name].append(time.perf_counter() - t0)
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    return {"ms_per_step": ms, "overhead": ms["deepspeed"] / ms["torch"] - 1}


def interleaved(a) -> dict:
    cmd = [sys.executable, __file__, "--interleaved-worker", "--steps", str(a.steps), "--hidden", str(a.hidden),
           "--batch", str(a.batch), "--zero", str(a.zero)]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True)  # ddaebm picks a free MASTER_PORT
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--hidden", type=int, default=300)
    p.add_argument("--batch", type=int, default=200)
    p.add_argument("--zero", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3,
                   help="runs of each of the main configurations, interleaved; a run's figures vary by ~5-10%% "
                        "from one process to the next here, so each figure is the median over rounds")
    p.add_argument("--interleaved-worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.interleaved_worker:
        print(json.dumps(interleaved_worker(a.steps, a.hidden, a.batch, a.zero)))
        return
    model = [f"model.hidden={a.hidden}", f"data.batch={a.batch}"]
    model_weak = [f"model.hidden={a.hidden}", f"data.batch={2 * a.batch}"]
    ds = ["dist.backend=deepspeed", f"dist.zero_stage={a.zero}"]
    never, every = ["train.ckpt_every=1000000"], ["train.ckpt_every=1"]
    main_runs = {"torch_1": (1, model + never), "ds_1": (1, model + ds + never), "ds_2": (2, model + ds + never),
                 "ds_2_weak": (2, model_weak + ds + never)}
    rounds: dict[str, list[dict]] = {k: [] for k in main_runs}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i in range(a.rounds):
            for key, (nproc, extra) in main_runs.items():
                rounds[key].append(run(tmp / f"{key}-{i}", a.steps, nproc, extra))
        for key, runs in rounds.items():
            out[key] = {m: statistics.median(r[m] for r in runs) for m in runs[0]}
        # Save cost: the same run checkpointing every step, minus the plain step.
        out["ds_2_ckpt_every_step"] = run(tmp / "d2c", min(a.steps, 50), 2, model + ds + every)
        # Load cost: resuming d2c (its last checkpoint) against starting fresh, to the first step.
        out["ds_2_resume"] = run(tmp / "d2c", min(a.steps, 50) + 5, 2, model + ds + never)
    sps = {k: (2 if k.endswith("weak") else 1) * a.batch / v["sec_per_step"] for k, v in out.items()}
    report = {
        "samples_per_s": {"torch_1rank": sps["torch_1"], "deepspeed_1rank": sps["ds_1"],
                          "deepspeed_2ranks_same_global_batch": sps["ds_2"],
                          "deepspeed_2ranks_same_batch_per_rank": sps["ds_2_weak"]},
        "speedup_2_over_1_ranks": {"same_global_batch": sps["ds_2"] / sps["ds_1"],
                                   "same_batch_per_rank": sps["ds_2_weak"] / sps["ds_1"]},
        "deepspeed_overhead_per_step": {
            "separate_runs": out["ds_1"]["sec_per_step"] / out["torch_1"]["sec_per_step"] - 1,
            "one_process_interleaved": interleaved(a)},
        "first_step_s": {k: out[k]["first_step_s"] for k in ("torch_1", "ds_1", "ds_2")},
        "save_s_2ranks": out["ds_2_ckpt_every_step"]["sec_per_step"] - out["ds_2"]["sec_per_step"],
        # Resume (load) minus fresh start to the first step; a fresh start also plots reals.png, so this
        # understates the load by that plot (~0.5 s at toy size) and may come out negative at toy size.
        "resume_minus_fresh_first_step_s": out["ds_2_resume"]["first_step_s"] - out["ds_2"]["first_step_s"],
        "sec_per_step_each_round": {k: [round(r["sec_per_step"], 5) for r in v] for k, v in rounds.items()},
        "config": vars(a),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
