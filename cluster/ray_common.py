"""What cluster/sweep.py and cluster/train.py share: finding the checkout, starting or joining Ray, the rank setup
inside a Ray Train worker, and training a ddaebm run in chunks with a report after each.

`ray submit cluster.yaml sweep.py` uploads the script alone to the head node's home directory, so the scripts
import this module from the checkout that holds the installed ddaebm (`load()` below) and register it with
cloudpickle by value: Ray's workers then need nothing on their path but ddaebm itself.

Training goes through ddaebm's own loop (`ddaebm.training.loop.train` with `slice_steps`), so a run directory
written here has the layout, checkpoints and resume rule of `ddaebm train` and of slurm/launch.sh: any of the
three continues a run another one started.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

EXIT_USAGE, EXIT_FAILED, EXIT_NONFINITE = 2, 1, 3  # as `ddaebm train`


def checkout_root() -> Path:
    """The ddaebm checkout: $DDAEBM_ROOT, else the folder above the installed (editable) ddaebm package."""
    if os.environ.get("DDAEBM_ROOT"):
        return Path(os.environ["DDAEBM_ROOT"]).resolve()
    import ddaebm

    return Path(ddaebm.__file__).resolve().parents[1]


def resolve_config(path: str) -> Path:
    """A config path as given (relative to the cwd), else relative to the checkout (`ray submit` runs in ~)."""
    for candidate in (Path(path), checkout_root() / path):
        if candidate.is_file():
            return candidate.resolve()
    from ddaebm.config import ConfigError

    raise ConfigError(f"config file not found: {path} (looked in {Path.cwd()} and {checkout_root()})")


def default_run_root() -> Path:
    """Where run directories live: $DDAEBM_RUN_ROOT, else <checkout>/runs (as slurm/launch.sh)."""
    return Path(os.environ.get("DDAEBM_RUN_ROOT") or checkout_root() / "runs").resolve()


def start_ray(local: bool, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """A private Ray on this machine (--local), or the running cluster (`ray submit` runs on its head node)."""
    import ray

    if local:
        # address="local" always starts a new instance: a bare ray.init() would join a cluster started earlier on
        # this machine by `ray start` (found through /tmp/ray), and then refuse num_cpus.
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                 log_to_driver=True)
    else:
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"))


def ray_rank_setup(backend: str):
    """Inside a Ray Train worker: ddaebm's rank variables from Ray's context, DeepSpeed on Ray's process group.

    Ray Train has already started torch.distributed (gloo on CPU, nccl on GPU) with MASTER_ADDR/PORT of its own
    choosing; ddaebm reads RANK/WORLD_SIZE/LOCAL_RANK, and DeepSpeed wraps the existing group.
    """
    import ray.train
    import torch

    from ddaebm.distributed import DistEnv

    ctx = ray.train.get_context()
    env = DistEnv(ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank())
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world), LOCAL_RANK=str(env.local_rank))
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "ddaebm-torch-extensions"))
    if backend == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   auto_mpi_discovery=False, verbose=False, rank=env.rank, world_size=env.world)
    return env


def rewind(run_dir: Path, step: int) -> None:
    """Forget what a run dir holds past `step` (checkpoints, stats rows): a trial restored from step's checkpoint
    redoes those steps, and must neither resume from nor log twice what the killed attempt left behind."""
    from ddaebm.training.checkpoint import POINTER, checkpoint_root, complete_checkpoints

    for ckpt in complete_checkpoints(run_dir):
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt, ignore_errors=True)
    (checkpoint_root(run_dir) / POINTER).unlink(missing_ok=True)  # falls back to the newest complete one
    stats = run_dir / "stats.jsonl"
    if stats.is_file():
        rows = [line for line in stats.read_text().splitlines() if json.loads(line)["step"] <= step]
        stats.write_text("".join(line + "\n" for line in rows))


def stats_rows(run_dir: Path, after_step: int = -1) -> list[dict]:
    path = run_dir / "stats.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [row for row in rows if row["step"] > after_step]


def current_checkpoint(run_dir: Path, step: int) -> Path | None:
    """The run dir's checkpoint of `step`, if that is the newest (a non-finite streak skips the slice's one)."""
    from ddaebm.training.checkpoint import latest_checkpoint

    latest = latest_checkpoint(run_dir)
    return latest if latest is not None and latest.name == f"step-{step:09d}" else None


def train_in_chunks(cfg, run_dir: Path, state: dict | None, rank: int, world: int, every: int,
                    on_chunk: Callable) -> object:
    """Train to cfg.train.steps in slices of `every` steps, each ending with a checkpoint; after each slice
    `on_chunk(trainer, start_step, done)` reports. Returns the trainer. NonFiniteStop propagates."""
    from ddaebm.training.loop import train

    trainer = None
    while True:
        start = state["step"] if trainer is None and state else (trainer.step if trainer else 0)
        trainer = train(cfg, run_dir, state if trainer is None else None, rank, world, trainer=trainer,
                        slice_steps=every)
        done = trainer.step >= cfg.train.steps
        on_chunk(trainer, start, done)
        if done:
            return trainer


def log(msg: str) -> None:
    print(f"[ddaebm-ray] {msg}", file=sys.stderr, flush=True)
