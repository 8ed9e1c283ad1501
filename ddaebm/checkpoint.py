"""Checkpoints in the run directory: `checkpoints/step-NNNNNNNNN/state.pt` plus a `latest` pointer.

A checkpoint is written into a temporary folder and renamed into place only when complete, then the
pointer is replaced atomically; so a job killed mid-save leaves the previous checkpoint as the newest
complete one. Only the last `keep` checkpoints are kept. A `manifest.json` lists every file's size and
sha256; resume verifies it and falls back to the previous checkpoint when the newest is truncated or
corrupted. Every rank writes what its engines keep outside state.pt (DeepSpeed's ZeRO shards) into
`engines/<name>/` of the same temporary folder; rank 0 writes state.pt, the manifest, the rename and the
pointer only after all ranks finished (`save_checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Callable

import torch

from ddaebm import distributed
from ddaebm.errors import BadInput
from ddaebm.fsio import write_atomic

STATE_FILE = "state.pt"
MANIFEST = "manifest.json"
POINTER = "latest"
ENGINES = "engines"
_STEP_DIR = re.compile(r"^step-(\d{9})$")


class CheckpointError(BadInput):
    """A checkpoint that is missing, truncated or altered (bad input: the run dir the user pointed at)."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (corrupted or truncated) in favour of an older one."""


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_state(folder: Path, state: dict) -> None:
    with open(folder / STATE_FILE, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def _publish(run_dir: Path, tmp: Path, final: Path, keep: int) -> None:
    """Seal a fully written temporary folder: manifest, rename into place, pointer, pruning."""
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {str(p.relative_to(tmp)): [p.stat().st_size, _sha256(p)] for p in files}
    write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=0))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_atomic(checkpoint_root(run_dir) / POINTER, final.name + "\n")
    for old in complete_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(run_dir: Path, step: int, engines: dict, state: Callable[[], dict], keep: int,
                    lead: bool = True) -> Path:
    """Write the checkpoint of `step`: every rank's engines save what state.pt cannot carry into
    `engines/<name>/` of one temporary folder, rank 0 writes state.pt (`state()`), then seals the checkpoint
    (manifest, rename, `latest`, pruning) after all ranks finished. Collective on every rank of a process group;
    without one, the same steps in one process.

    The temporary folder's name is the same on all ranks (they write into one folder). The checkpoint exists for
    resume only once rank 0 renamed it after the barrier that follows every rank's writes.
    """
    root = checkpoint_root(run_dir)
    final = root / f"step-{step:09d}"
    tmp = root / f".{final.name}.tmp"
    if lead:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    distributed.barrier()
    for name, engine in engines.items():
        engine.save(tmp / ENGINES / name)
    if lead:
        _write_state(tmp, state())
    distributed.barrier()  # every rank's shards are on disk
    if lead:
        _publish(run_dir, tmp, final, keep)
    distributed.barrier()  # nobody moves on (or exits after a preemption) before the pointer is written
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError when a file listed in the manifest is missing, truncated or altered."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():  # written before manifests existed: only the load check applies
        return
    try:
        listed = json.loads(manifest.read_text())
    except ValueError:
        raise CheckpointError(f"{manifest} is not valid JSON") from None
    for rel, (size, digest) in listed.items():
        file = Path(path) / rel
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        if file.stat().st_size != size:
            raise CheckpointError(f"{file} has {file.stat().st_size} bytes, {size} were written")
        if _sha256(file) != digest:
            raise CheckpointError(f"{file} does not match its sha256")


def newest_valid_checkpoint(run_dir: Path, warn: bool = True) -> tuple[Path, dict] | None:
    """(path, state) of the newest checkpoint that verifies and loads; a bad one is reported and skipped."""
    newest = latest_checkpoint(run_dir)
    candidates = [newest] + [p for p in reversed(complete_checkpoints(run_dir)) if p != newest] if newest else []
    for path in candidates:
        try:
            verify_checkpoint(path)
            return path, load_checkpoint(path)
        except CheckpointError as err:
            if warn:
                warnings.warn(f"skipping checkpoint {path}: {err}; trying the previous one", CheckpointWarning,
                              stacklevel=2)
    return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `latest` points at, else the newest complete one, else None."""
    root = checkpoint_root(run_dir)
    pointer = root / POINTER
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if (target / STATE_FILE).is_file():
            return target
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path) -> dict:
    """The state saved in checkpoint folder (or state file) `path`."""
    path = Path(path)
    file = path / STATE_FILE if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or corrupted file
        raise CheckpointError(f"checkpoint {file} cannot be read: {err}") from None
