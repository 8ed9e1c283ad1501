"""Ranks and the process group: discovery from the launcher's environment, init, small collectives, exit.

One process (WORLD_SIZE unset or 1, torch backend) needs no environment variable, starts no process group and
never imports DeepSpeed. Under torchrun the rank comes from RANK/WORLD_SIZE/LOCAL_RANK; under a bare `srun`
from SLURM_PROCID/SLURM_STEP_NUM_TASKS (or SLURM_NTASKS)/SLURM_LOCALID, with the master taken from the
first host of the step's node list. Every helper is a no-op without a process group, so callers need no
`if world > 1`.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch

from ddaebm.errors import BadInput


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def lead(self) -> bool:
        return self.rank == 0


def _first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[03-05,9],cpu1' -> 'gpu03'."""
    m = re.match(r"([^,\[]+)(?:\[([^\],\-]+))?", nodelist.strip())
    if not m:
        raise RuntimeError(f"cannot read the SLURM node list {nodelist!r}; set MASTER_ADDR")
    return m.group(1) + (m.group(2) or "")


def _map_slurm(environ) -> None:
    """Fill torchrun's variables from a bare `srun` task's, when torchrun's are absent."""
    if "RANK" in environ or "SLURM_PROCID" not in environ:
        return
    environ["RANK"] = environ["SLURM_PROCID"]
    environ["WORLD_SIZE"] = environ.get("SLURM_STEP_NUM_TASKS", environ.get("SLURM_NTASKS", "1"))
    environ["LOCAL_RANK"] = environ.get("SLURM_LOCALID", "0")
    nodes = environ.get("SLURM_STEP_NODELIST", environ.get("SLURM_JOB_NODELIST", "127.0.0.1"))
    environ.setdefault("MASTER_ADDR", _first_host(nodes))
    # Same port on every task of the job, different between jobs sharing a node.
    environ.setdefault("MASTER_PORT", str(20000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000))


def discover(environ=None) -> DistEnv:
    """This process's rank, world size and local rank, from the launcher's environment."""
    environ = os.environ if environ is None else environ
    _map_slurm(environ)
    try:
        env = DistEnv(int(environ.get("RANK", 0)), int(environ.get("WORLD_SIZE", 1)), int(environ.get("LOCAL_RANK", 0)))
    except ValueError as err:
        raise RuntimeError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {err}") from None
    if not 0 <= env.rank < env.world:
        raise RuntimeError(f"RANK={env.rank} is outside WORLD_SIZE={env.world}")
    return env


def resolve_device(name: str) -> torch.device:
    """dist.device: 'auto' is this rank's GPU when CUDA is available, else the CPU; 'cuda' needs CUDA (the launch
    check refuses it before training, ddaebm/launch.py). Which GPU: cuda_index."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise BadInput("dist.device=cuda but CUDA is not available here; use dist.device=auto or cpu")
    return torch.device("cuda", cuda_index(discover().local_rank, torch.cuda.device_count()))


def cuda_index(local_rank: int, visible: int) -> int:
    """The GPU of a rank among the `visible` ones: its local rank where every rank of the node sees all of them
    (torchrun, a plain srun); 0 where each task sees one (srun --gpus-per-task=1 or --gpu-bind, cgroup-limited
    GPUs, Ray's per-worker GPUs), whatever its local rank."""
    if visible < 1:
        raise BadInput("CUDA is available but this process sees no GPU (CUDA_VISIBLE_DEVICES?)")
    if visible == 1:
        return 0
    if local_rank < visible:
        return local_rank
    raise BadInput(f"LOCAL_RANK={local_rank} but this process sees only {visible} GPUs: start at most {visible} "
                   "ranks per node, or give each task its own GPU (srun --gpus-per-task=1)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def needs_group(env: DistEnv, backend: str) -> bool:
    """DeepSpeed needs a process group even alone; the torch backend runs one process without one."""
    return env.world > 1 or backend == "deepspeed"


def collective_backend(device: torch.device) -> str:
    """The process group's backend for a training device: NCCL for GPUs, gloo for the CPU (also on a GPU node
    when dist.device=cpu: NCCL reduces CUDA tensors only)."""
    return "nccl" if device.type == "cuda" else "gloo"


def init(env: DistEnv, backend: str, timeout_s: int, device: str = "auto") -> None:
    """Start the process group whose collectives fail after `timeout_s`, for the training device that
    `device` (dist.device) resolves to on this rank: gloo on CPU, NCCL on the rank's GPU (bound to it)."""
    if not needs_group(env, backend) or is_initialized():
        return
    # A single DeepSpeed process without a launcher would try MPI discovery (docs/architecture.md).
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    # torch's own group, bound to the GPU (device_id); DeepSpeed then adopts it instead of starting its own.
    torch.distributed.init_process_group(collective_backend(dev), rank=env.rank, world_size=env.world,
                                         timeout=timedelta(seconds=timeout_s),
                                         device_id=dev if dev.type == "cuda" else None)
    if backend == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend=collective_backend(dev), timeout=timedelta(seconds=timeout_s),
                                   auto_mpi_discovery=False, verbose=False, rank=env.rank, world_size=env.world,
                                   dist_init_required=False)


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if is_initialized() else 1


def barrier() -> None:
    if is_initialized():
        torch.distributed.barrier()


def collective_device() -> torch.device:
    """Where small collectives' tensors must live: the rank's GPU under NCCL (it reduces CUDA tensors only)."""
    if is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def max_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """`t` maxed over ranks, in one collective on its own device (0/1 flags: OR), without a host read (decisions
    every rank must share: stop, skip). `t` must live where the process group's backend reduces (CPU for gloo,
    the rank's GPU for NCCL), which the training device is (init picks the backend from it)."""
    if world_size() == 1:
        return t
    t = t.clone()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean of `t` over ranks (for logged statistics; every rank must call it with the same shape)."""
    if world_size() == 1:
        return t
    t = t.detach().float().to(collective_device()).clone()
    torch.distributed.all_reduce(t)
    return (t / world_size()).cpu()


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed pipe must not stop the exit
            pass


def shutdown(code: int) -> None:
    """Leave the process group and exit with `code`, never returning.

    gloo/DeepSpeed processes abort at interpreter exit now and then ("terminate called without an active
    exception"); barrier, destroy, flush and os._exit exits cleanly (docs/architecture.md). A failed peer makes the
    barrier raise after the timeout; the exit code is kept either way.
    """
    if is_initialized():
        try:
            if code == 0:
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        except Exception as err:  # noqa: BLE001
            print(f"ddaebm: rank shutdown: {err}", file=sys.stderr)
            code = code or 1
    _flush()
    os._exit(code)


def abort(code: int) -> None:
    """Exit at once after a failed collective: a barrier would only wait for the dead peer."""
    _flush()
    os._exit(code)
