"""Checkpoints in the run directory: `checkpoints/step-NNNNNNNNN/state.pt` plus a `latest` pointer.

A checkpoint is written into a temporary folder and renamed into place only when complete, then the
pointer is replaced atomically; so a job killed mid-save leaves the previous checkpoint as the newest
complete one. Only the last `keep` checkpoints are kept.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

STATE_FILE = "state.pt"
POINTER = "latest"
_STEP_DIR = re.compile(r"^step-(\d{9})$")


class CheckpointError(RuntimeError):
    pass


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` in one rename, never leaving a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, step: int, state: dict, keep: int) -> Path:
    """Write `state` as the checkpoint of `step`, point `latest` at it and prune old ones."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:09d}"
    tmp = root / f".{final.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with open(tmp / STATE_FILE, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_atomic(root / POINTER, final.name + "\n")
    for old in complete_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


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
