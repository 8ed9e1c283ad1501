"""Writing a checkpoint: every rank's engine files, rank 0's state.pt, the seal (manifest, rename), pruning.

A checkpoint is written into `checkpoints/.step-N.tmp/` and renamed to `step-N/` only when complete and sealed
(its manifest written last), so a job killed mid-save leaves the earlier checkpoints as they were, and its
temporary folder is removed at the next start (files.remove_leftovers). A write that fails (a full disk, an
I/O error, a permission) fails on every rank alike: the ranks agree after each stage, the temporary folder is
removed and `CheckpointWriteError` raised, which the command line ends with one line and exit status 4.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import torch

from ddaebm import distributed
from ddaebm.checkpoint.files import (ENGINES, checkpoint_root, fsync_dir, sealed_checkpoints, step_of, write_manifest,
                                     write_pointer)
from ddaebm.checkpoint.state import write_state


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, I/O error, permission): its temporary folder is removed, every
    earlier checkpoint is intact, and running the same command again resumes from the newest."""


def save_checkpoint(run_dir: Path, step: int, engines: dict, state: Callable[[], dict], keep: int,
                    lead: bool = True) -> Path:
    """Write the checkpoint of `step`: every rank's engines save what state.pt cannot carry into `engines/<name>/`
    of one temporary folder, rank 0 writes state.pt (`state()`), then seals it (manifest, rename, `latest`,
    pruning to `keep`, 0 = keep all). Collective on every rank of a process group; without one, the same stages
    in one process. The checkpoint exists for resume only once sealed, after every rank's files are written."""
    root = checkpoint_root(run_dir)
    final = root / f"step-{step:09d}"
    tmp = root / f".{final.name}.tmp"
    stage = _Stages(step, tmp, lead)
    stage.run("preparing its folder", lambda: _prepare(tmp, engines), lead)
    for name, engine in engines.items():
        # DeepSpeed's save ends in a barrier that the ranks whose writes succeeded wait in: a rank whose write
        # failed joins it (join_barrier), so that all of them reach the agreement after it instead of a timeout.
        stage.run(f"writing engine {name}", lambda: engine.save(tmp / ENGINES / name), True, join_barrier=True)
    stage.run("writing state.pt", lambda: write_state(tmp, state()), lead)
    stage.run("sealing it", lambda: _seal(run_dir, tmp, final, keep), lead)
    return final


class _Stages:
    """Runs one stage of a save on the ranks that take part, then agrees on its outcome over all ranks."""

    def __init__(self, step: int, tmp: Path, lead: bool):
        self.step, self.tmp, self.lead = step, tmp, lead

    def run(self, what: str, fn: Callable[[], object], here: bool, join_barrier: bool = False) -> None:
        error = None
        if here:
            try:
                fn()
            except (OSError, RuntimeError) as err:  # torch.save to a path reports a failed write as RuntimeError
                error = err
                if join_barrier and distributed.is_initialized():
                    distributed.barrier()
        if not _any_rank(error is not None):
            return
        if self.lead:
            shutil.rmtree(self.tmp, ignore_errors=True)
        cause = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}" if error else "failed on another rank"
        raise CheckpointWriteError(f"the checkpoint of step {self.step} could not be written ({what}: {cause}; "
                                   f"{_free_space(self.tmp.parent)}); its temporary folder is removed and the "
                                   "earlier checkpoints are intact: free space (or fix the folder) and run the same "
                                   "command again to resume")


def _any_rank(flag: bool) -> bool:
    """`flag` OR-ed over the ranks of the process group (itself without one)."""
    if not distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return flag
    gpu = torch.distributed.get_backend() == "nccl"
    t = torch.tensor([float(flag)], device=torch.device("cuda", torch.cuda.current_device()) if gpu else "cpu")
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


def _free_space(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free there"
    except OSError:
        return "free space unknown"


def _prepare(tmp: Path, engines: dict) -> None:
    """The temporary folder, empty, with a folder per engine (so no engine's own save has to create one)."""
    tmp.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in engines:
        (tmp / ENGINES / name).mkdir(parents=True)


def _seal(run_dir: Path, tmp: Path, final: Path, keep: int) -> None:
    """Manifest (the seal), rename into place, `latest`, pruning. After the rename the checkpoint is complete:
    what follows is best effort and cannot fail the save."""
    write_manifest(tmp)
    shutil.rmtree(final, ignore_errors=True)  # a folder of the same step from a run killed before its seal
    os.replace(tmp, final)
    fsync_dir(final.parent)
    write_pointer(run_dir)
    prune(run_dir, final, keep)


def prune(run_dir: Path, newest: Path, keep: int) -> list[Path]:
    """Remove sealed checkpoints older than `newest` beyond the `keep` newest (0: keep all). `newest` itself is
    never removed; folders that are not sealed (set aside at start), or newer than `newest`, are not counted."""
    if keep <= 0:
        return []
    older = [p for p in sealed_checkpoints(run_dir) if step_of(p) < step_of(newest)]
    drop = older[:max(len(older) - (keep - 1), 0)]
    for path in drop:
        shutil.rmtree(path, ignore_errors=True)
    return drop
