"""What cluster/sweep.py and cluster/train.py share: the command-line options of a Ray job, finding the checkout,
the launch check for the workers, starting or joining Ray, a Ray Train job of ddaebm workers and the rank setup
inside one, and the test switch that kills a process once.

How the scripts reach this module: `ray submit cluster.yaml sweep.py` uploads the script alone to the head
node's home directory, so each script starts with the same few lines that put this folder on sys.path (beside
the script, else the cluster/ folder of the checkout that holds the installed ddaebm) and import it; nothing of
cluster/ is importable before them, which is why they cannot live here. `start_ray` then registers every module
of this folder with cloudpickle by value, so Ray's workers receive their code with the trial or training
function and need nothing on their path but ddaebm itself.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

EXIT_USAGE, EXIT_FAILED, EXIT_NONFINITE = 2, 1, 3  # as `ddaebm train`


@dataclass(frozen=True)
class WorkerShape:
    """How a Ray Train job is laid out: its ranks, the resources each holds, and how often the group restarts."""

    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    max_failures: int

    @classmethod
    def of(cls, args: argparse.Namespace) -> WorkerShape:
        return cls(args.workers, args.cpus_per_worker, args.gpus_per_worker, args.max_failures)


# ---------------------------------------------------------------------------------------------- command line

def script_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose help is the script's docstring, with CONFIG; the script adds its own options next."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=doc)
    p.add_argument("config", help="ddaebm config (relative to the cwd or the checkout)")
    return p


def add_ray_options(p: argparse.ArgumentParser, workers_help: str, max_failures: int, failures_help: str) -> None:
    """The worker shape, where Ray runs, and the test switch: the same flags in both scripts."""
    p.add_argument("--workers", type=int, default=1, help=workers_help)
    p.add_argument("--cpus-per-worker", type=float, default=1)
    p.add_argument("--gpus-per-worker", type=float, default=0, help="1 on GPU nodes: one GPU per rank")
    p.add_argument("--max-failures", type=int, default=max_failures, help=failures_help)
    p.add_argument("--local", action="store_true", help="start a private Ray here instead of joining the cluster")
    p.add_argument("--num-cpus", type=int, help="--local: logical CPUs Ray may use (default all)")
    p.add_argument("--crash-once-at", type=int, help=argparse.SUPPRESS)  # tests: SIGKILL a process once


def parse_with_overrides(p: argparse.ArgumentParser, argv=None) -> tuple[argparse.Namespace, list[str]]:
    """(options, key=value overrides): the overrides are what argparse does not know, and must be key=value."""
    args, overrides = p.parse_known_args(argv)
    bad = [a for a in overrides if a.startswith("-") or "=" not in a]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    return args, overrides


def usage_error(prog: str, err: Exception) -> int:
    """Bad input, said in one line before Ray starts (nothing is left behind), with `ddaebm train`'s status."""
    print(f"{prog}: error: {err}", file=sys.stderr)
    return EXIT_USAGE


# ---------------------------------------------------------------------------------------------- places

def checkout_root() -> Path:
    """The ddaebm checkout: $DDAEBM_ROOT, else the one this module's cluster/ folder belongs to, which is the
    script's own checkout (or, after `ray submit` uploaded the script alone, the checkout of the installed ddaebm,
    where the script found this module). Never another checkout that happens to hold the installed package."""
    if os.environ.get("DDAEBM_ROOT"):
        return Path(os.environ["DDAEBM_ROOT"]).resolve()
    return Path(__file__).resolve().parents[1]


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


def check_workers(cfg, shape: WorkerShape) -> None:
    """ddaebm's launch check for `shape.workers` ranks where Ray will place them: CUDA counts as available only
    when --gpus-per-worker gives each a GPU (the driver's own node, often a CPU-only head, does not train)."""
    from ddaebm.launch import check_launch

    check_launch(cfg, shape.workers, cuda_available=shape.gpus_per_worker > 0)


# ---------------------------------------------------------------------------------------------- Ray

def start_ray(local: bool, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """A private Ray on this machine (--local), or the running cluster (`ray submit` runs on its head node).
    Before anything is shipped to a worker, this folder's modules are registered to travel by value."""
    import ray

    ship_by_value()
    if local:
        # address="local" always starts a new instance: a bare ray.init() would join a cluster started earlier on
        # this machine by `ray start` (found through /tmp/ray), and then refuse num_cpus.
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                 log_to_driver=True)
    else:
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"))


def check_cluster_fits(cpus: float, gpus: float, what: str) -> None:
    """Refuse (BadInput) a request the Ray cluster cannot hold at all: it would wait for ever (Tune only warns,
    Ray Train retries its worker group's start-up). The resources Ray knows now: an autoscaling cluster must
    have its worker nodes up (min_workers)."""
    import ray

    have = ray.cluster_resources()
    short = [f"{need:g} {kind}" for kind, need in (("CPU", cpus), ("GPU", gpus)) if need > have.get(kind, 0) + 1e-9]
    if short:
        from ddaebm.errors import BadInput

        raise BadInput(f"{what} needs {' and '.join(short)} (--workers x --cpus-per-worker/--gpus-per-worker), the "
                       f"Ray cluster has {have.get('CPU', 0):g} CPU and {have.get('GPU', 0):g} GPU: lower them, or "
                       "start more (or larger) nodes")


def ship_by_value() -> None:
    """Register every imported module of this folder with cloudpickle by value: a Ray worker's sys.path lacks
    cluster/, so it must get their code with the function it runs rather than import them by name."""
    from ray import cloudpickle

    here = Path(__file__).resolve().parent
    for name, module in list(sys.modules.items()):
        source = getattr(module, "__file__", None)
        if name != "__main__" and source and Path(source).resolve().parent == here:
            cloudpickle.register_pickle_by_value(module)


START_TRIES = 5  # Ray Train worker-group start-ups (60 s each, RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S) before failing


def torch_trainer(loop: Callable, loop_config: dict, shape: WorkerShape, timeout_s: float, name: str,
                  storage: str, callbacks: tuple = ()):
    """A Ray Train TorchTrainer running `loop(loop_config)` on `shape.workers` workers; the same name and
    storage on a retry hand the workers the run's last registered checkpoint. A worker group that cannot start
    (its resources never free up) fails the job after START_TRIES tries instead of retrying for ever (Ray's
    default controller_failure_limit)."""
    from ray import train
    from ray.train.torch import TorchConfig, TorchTrainer

    gpus = shape.gpus_per_worker
    return TorchTrainer(
        loop, train_loop_config=loop_config,
        scaling_config=train.ScalingConfig(num_workers=shape.workers, use_gpu=gpus > 0,
                                           resources_per_worker={"CPU": shape.cpus_per_worker, "GPU": gpus}),
        torch_config=TorchConfig(timeout_s=timeout_s),
        run_config=train.RunConfig(name=name, storage_path=str(storage), callbacks=list(callbacks),
                                   failure_config=train.FailureConfig(max_failures=shape.max_failures,
                                                                      controller_failure_limit=START_TRIES)))


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


# ---------------------------------------------------------------------------------------------- runs

def stats_rows(run_dir: Path, after_step: int = -1) -> list[dict]:
    """The run's stats.jsonl rows past `after_step`: what a report says of the steps it covers."""
    path = run_dir / "stats.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [row for row in rows if row["step"] > after_step]


def die_once(marker: Path, message: str) -> None:
    """Test switch (--crash-once-at): SIGKILL this process, unless `marker` shows that one died already."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    log(message)
    os.kill(os.getpid(), signal.SIGKILL)


def log(msg: str) -> None:
    print(f"[ddaebm-ray] {msg}", file=sys.stderr, flush=True)
