"""The start of a training job: the run dir's lock, and the checkpoint it continues from, decided once.

The run dir's writer (the one process, or rank 0 of a launcher) takes the lock (ddaebm/rundir.py), selects the
checkpoint (ddaebm/checkpoint/select.py: the newest that verifies), checks it belongs to this experiment and that
`train.steps` is not below its step, sets aside what did not verify and removes killed writers' leftovers, and,
for a DeepSpeed run resumed at another world size, converts its ZeRO shards to a universal checkpoint. Under a
launcher this happens after the process group is up, on rank 0 alone, while the other ranks wait for its decision
in one broadcast on a side group whose timeout is `dist.resume_timeout_s` (hashing a checkpoint of a few GB and
converting it take longer than a collective's `dist.timeout_s` should wait); then every rank loads the chosen
checkpoint, whatever its own view of the filesystem would have picked. A bad input found there (another
experiment, a step target below the run's) reaches every rank as the same BadInput: one line, exit 2 on each.
"""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from ddaebm.checkpoint import (ENGINES, CheckpointError, CheckpointWarning, Selection, load_state, scan_files,
                               select_checkpoint, step_folders, tidy_run_dir, verify_listed, write_manifest)
from ddaebm.config import Config, ConfigError, experiment_differences
from ddaebm.errors import BadInput
from ddaebm.rundir import RunLock


@dataclass
class RunStart:
    """What a rank needs to start training: the state to load (None: from scratch) and, on the writer, the lock it
    holds until the job ends."""

    state: dict | None
    lock: RunLock | None = None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def check_resumable(cfg: Config, state: dict, where: Path) -> None:
    """`state` continues this experiment (its config differs only in RESUMABLE_CHANGES) up to train.steps."""
    diffs = experiment_differences(state["config"], cfg)
    if diffs:
        raise ConfigError(f"{where} holds a different experiment ({'; '.join(diffs[:4])}); "
                          "use another --run-dir or the same config")
    if cfg.train.steps < state["step"]:
        raise ConfigError(f"train.steps={cfg.train.steps} (--steps) is below step {state['step']}, which {where} has "
                          f"already reached: nothing to train; give --steps {state['step']} or more, or another "
                          "--run-dir")


def _with_folder(selection: Selection) -> dict | None:
    """The selected state, carrying its folder under "checkpoint_dir" (engines load their shards from there)."""
    if selection.state is None:
        return None
    path = Path(selection.path)
    selection.state["checkpoint_dir"] = str(path if path.is_dir() else path.parent)
    return selection.state


def prepare_run(cfg: Config, run_dir: Path, resume: str = "auto", warn: bool = True) -> dict | None:
    """The checkpoint state to resume `run_dir` from (None: start afresh), checked against `cfg`; reads only and
    takes no lock (tests, Ray Train workers). Raises BadInput before anything is written."""
    selection = select_checkpoint(run_dir, resume, engines=cfg.dist.backend == "deepspeed", warn=warn)
    if selection.state is not None:
        check_resumable(cfg, selection.state, selection.path)
    for note in selection.notes if warn else []:
        warnings.warn(note, CheckpointWarning, stacklevel=2)
    return _with_folder(selection)


def decide(cfg: Config, run_dir: Path, resume: str, world: int) -> tuple[Selection, RunLock]:
    """The writer's decision, under the run dir's lock (held on return): select, check, tidy, convert. Bad input
    leaves the run dir as it was (a lock file it created is removed again)."""
    lock = RunLock(run_dir)
    existed = run_dir.is_dir()
    if existed:
        lock.acquire()
    try:
        selection = select_checkpoint(run_dir, resume, engines=cfg.dist.backend == "deepspeed", warn=False)
        if selection.state is not None:
            check_resumable(cfg, selection.state, selection.path)
        if not existed:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire()
            if step_folders(run_dir):
                raise BadInput(f"{run_dir} got checkpoints from another trainer while this one started: run the same "
                               "command again to resume from them")
        lock.record()
        for note in tidy_run_dir(run_dir, selection):
            print(f"ddaebm: warning: {note}", file=sys.stderr, flush=True)
        _convert_for_world(cfg, selection, world)
    except BaseException:
        lock.release()
        raise
    return selection, lock


def _convert_for_world(cfg: Config, selection: Selection, world: int) -> None:
    """ZeRO 1/2 shards written at another world size, converted to a universal checkpoint here, by the writer,
    before any collective with a short timeout (the engines then find the conversion cached). A cached conversion
    carries its own manifest: one that does not match it (cut short, altered, or from before) is converted
    again, one that does is scanned like the shards before DeepSpeed unpickles it."""
    if cfg.dist.backend != "deepspeed" or selection.state is None:
        return
    from ddaebm.training.deepspeed_engine import UNIVERSAL_TAG, convert_to_universal, needs_universal

    if not needs_universal(cfg, selection.state, world):
        return
    folder = Path(_with_folder(selection)["checkpoint_dir"])
    for name in ("energy", "generator"):
        cached = folder / ENGINES / name / UNIVERSAL_TAG
        try:
            files = verify_listed(cached) if cached.is_dir() else None
        except CheckpointError:
            files = None
            shutil.rmtree(cached)
        if files is not None:
            scan_files(files)
            continue
        convert_to_universal(cached.parent)
        write_manifest(cached)


def start_here(cfg: Config, run_dir: Path, resume: str) -> RunStart:
    """One process: the decision and its state."""
    selection, lock = decide(cfg, run_dir, resume, world=1)
    return RunStart(_with_folder(selection), lock)


def start_ranked(cfg: Config, run_dir: Path, resume: str, rank: int, world: int) -> RunStart:
    """Every rank of the process group: rank 0 decides, the others wait for its decision (dist.resume_timeout_s),
    then each loads the chosen checkpoint; a rank that cannot fails them all (collective)."""
    group = torch.distributed.new_group(backend="gloo", timeout=timedelta(seconds=cfg.dist.resume_timeout_s))
    start, ok = RunStart(None), True
    try:
        if rank == 0:
            try:
                selection, start.lock = decide(cfg, run_dir, resume, world)
            except BadInput as err:
                _broadcast({"bad": str(err)}, group, rank)
                raise
            except BaseException as err:
                _broadcast({"failed": f"{type(err).__name__}: {err}"}, group, rank)
                raise
            path = None if selection.path is None else str(selection.path)
            _broadcast({"path": path, "step": selection.step}, group, rank)
            start.state = _with_folder(selection)
        else:
            decision = _broadcast(None, group, rank)
            if "bad" in decision:
                raise BadInput(decision["bad"])
            if "failed" in decision:
                raise RuntimeError(f"rank 0 failed while choosing the checkpoint: {decision['failed']}")
            ok, start.state = _load_chosen(decision, rank)
        _agree(ok, group, rank)
    except BaseException:
        start.release()
        raise
    finally:
        torch.distributed.destroy_process_group(group)
    return start


def _load_chosen(decision: dict, rank: int) -> tuple[bool, dict | None]:
    """(readable, state) of the checkpoint rank 0 chose, as this rank reads it (no state when it chose none)."""
    if decision["path"] is None:
        return True, None
    try:
        state = load_state(decision["path"])
    except BadInput as err:
        print(f"ddaebm: rank {rank} cannot read the checkpoint rank 0 chose: {err}", flush=True)
        return False, None
    if state["step"] != decision["step"]:
        print(f"ddaebm: rank {rank} reads step {state['step']} at {decision['path']}, rank 0 read step "
              f"{decision['step']}: the ranks see different files", flush=True)
        return False, None
    return True, _with_folder(Selection(Path(decision["path"]), state))


def _agree(ok: bool, group, rank: int) -> None:
    """Every rank read the chosen checkpoint, or all of them fail together (not each at its own timeout)."""
    t = torch.tensor([0.0 if ok else 1.0])
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=group)
    if t.item() > 0:
        raise RuntimeError(f"rank {rank}: a rank could not read the checkpoint rank 0 chose (see its log)")


def _broadcast(message: dict | None, group, rank: int) -> dict:
    """`message` from rank 0 to every rank of `group`, as JSON bytes in two tensor broadcasts (no pickle)."""
    if rank == 0:
        data = torch.tensor(list(json.dumps(message).encode()), dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.int64)
    else:
        size = torch.zeros(1, dtype=torch.int64)
    torch.distributed.broadcast(size, src=0, group=group)
    if rank != 0:
        data = torch.empty(int(size.item()), dtype=torch.uint8)
    torch.distributed.broadcast(data, src=0, group=group)
    return json.loads(bytes(data.tolist()).decode())
