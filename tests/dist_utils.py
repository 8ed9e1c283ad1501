"""Multi-process helpers for the distributed tests: real DeepSpeed on gloo, every process under a timeout.

Ranks run the real CLI, either under torchrun or spawned one Popen per rank with torchrun's variables set
(as `srun` would), so a test can signal or kill one rank. The DeepSpeed comm op is JIT-compiled once into a
stable cache (~50 s the first time on this machine, then loaded).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.conftest import CONFIGS, ROOT

CFG = str(CONFIGS / "toy" / "25gaussians.yaml")
# Tiny and without BatchNorm, whose batch statistics differ between a per-rank and the global batch. Adam's ε
# at 1e-3 (not 1e-8): Adam's first updates are ≈ lr·sign(g), so gradient entries that are zero up to float32
# rounding (1e-10 .. 1e-9 in this tiny network) would move by up to ~lr/10 whichever way the rounding of a
# particular order of sums fell; 1 and 2 ranks then part at 1e-3 relative after one step. With ε above the
# rounding noise and below the real gradients (1e-3 .. 1e-2), the comparison tests the gradients, and Adam is
# no longer blind to a wrong gradient scale (a missing average over ranks).
DS_TINY = ["model.hidden=32", "data.batch=32", "train.log_every=1", "train.snapshot_every=100000",
           "train.eval_at_end=false", "model.gen_norm=none", "dist.backend=deepspeed", "train.threads=1",
           "optim.adam_eps=1e-3"]
TIMEOUT = 240  # seconds for any one multi-process run


def ds_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "ddaebm-torch-extensions"))
    env["OMP_NUM_THREADS"] = "1"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID"):
        env.pop(key, None)
    return env


def train_args(run_dir: Path, steps: int, extra=()) -> list[str]:
    return ["train", CFG, "--run-dir", str(run_dir), "--steps", str(steps), *DS_TINY, *extra]


def run_ranks(args: list[str], nproc: int, cwd: Path, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    """The CLI on `nproc` ranks (torchrun), or as one plain process when nproc is 1."""
    from ddaebm.distributed import free_port

    if nproc == 1:
        cmd = [sys.executable, "-m", "ddaebm", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(free_port()), "-m", "ddaebm", *args]
    # TMPDIR: torchrun's agent leaves a torchelastic_* folder in the temp dir per launch: keep it in the test's folder
    return subprocess.run(cmd, cwd=cwd, env=ds_env() | {"TMPDIR": str(cwd)}, capture_output=True, text=True,
                          timeout=timeout)


def spawn_ranks(args: list[str], nproc: int, cwd: Path, log_dir: Path) -> list[subprocess.Popen]:
    """One process per rank with torchrun's variables (no agent that would kill the others for us)."""
    from ddaebm.distributed import free_port

    port = str(free_port())
    procs = []
    for rank in range(nproc):
        env = ds_env() | {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
                          "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        log = open(log_dir / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "ddaebm", *args], cwd=cwd, env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int | None]:
    """Exit codes, None for a process still running at the deadline (then killed, so nothing outlives a test)."""
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(max(deadline - time.monotonic(), 0.1)))
        except subprocess.TimeoutExpired:
            codes.append(None)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()
    return codes


def wait_for_stats(run_dir: Path, rows: int, procs, timeout: float = TIMEOUT) -> None:
    """Block until stats.jsonl holds `rows` lines (training is under way) or a process ended."""
    deadline = time.monotonic() + timeout
    path = run_dir / "stats.jsonl"
    while time.monotonic() < deadline:
        if path.is_file() and len(path.read_text().splitlines()) >= rows:
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a rank ended early: {[p.poll() for p in procs]}")
        time.sleep(0.2)
    raise AssertionError(f"no {rows} rows in {path} after {timeout} s")


def stats(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]


def final_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoints" / f"step-{step:09d}" / "state.pt", map_location="cpu",
                       weights_only=True)
    return {f"{e}.{k}": v for e in ("energy", "generator") for k, v in state["engines"][e]["module"].items()}


def max_weight_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)
