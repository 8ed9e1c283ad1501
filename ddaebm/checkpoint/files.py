"""The checkpoint folder's layout: names, listing, manifests, the `latest` pointer, folders set aside, leftovers.

    checkpoints/step-NNNNNNNNN/   a sealed checkpoint: state.pt, engines/<name>/..., manifest.json (written last)
    checkpoints/.step-NNNNNNNNN.tmp/   one being written (renamed to step-N when sealed; removed at the next start
                                       when its writer died)
    checkpoints/latest            the newest sealed checkpoint's name, for people and tools; resume never trusts it
    checkpoints/corrupt/step-N/   a checkpoint that did not verify, set aside with a WHY.txt
    checkpoints/superseded/step-N/   a checkpoint newer than the one an explicit --resume continued from
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from ddaebm.errors import BadInput
from ddaebm.fsio import write_atomic

STATE_FILE = "state.pt"
MANIFEST = "manifest.json"
POINTER = "latest"
ENGINES = "engines"
CORRUPT = "corrupt"
SUPERSEDED = "superseded"
WHY = "WHY.txt"
_STEP_DIR = re.compile(r"^step-(\d{9})$")
_TMP_DIR = re.compile(r"^\.step-\d{9}\.tmp$")
_ATOMIC_TMP = re.compile(r"^\..+\.tmp\d+$")  # fsio.write_atomic's temporary names
_UNIVERSAL_TMP = ".ds_universal.tmp"  # a universal conversion killed halfway (training/deepspeed_engine.py)


class CheckpointError(BadInput):
    """A checkpoint that is missing, truncated, altered or not a ddaebm checkpoint (bad input: the run dir or path
    the user pointed at)."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped or set aside (it does not verify) in favour of an older one."""


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_of(path: Path) -> int:
    return int(_STEP_DIR.match(Path(path).name).group(1))


def step_folders(run_dir: Path) -> list[Path]:
    """Every `step-N` folder of the run, sealed or not, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir()), key=step_of)


def sealed_checkpoints(run_dir: Path) -> list[Path]:
    """Step folders with their manifest (sealed by their writer; not yet verified), oldest first."""
    return [p for p in step_folders(run_dir) if (p / MANIFEST).is_file()]


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Step folders holding a state.pt, oldest first."""
    return [p for p in step_folders(run_dir) if (p / STATE_FILE).is_file()]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """manifest.json: the size and sha256 of every file in `folder` (the seal: written last)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    manifest = {str(p.relative_to(folder)): [p.stat().st_size, sha256(p)] for p in files}
    write_atomic(folder / MANIFEST, json.dumps(manifest, indent=0))


def read_manifest(folder: Path) -> list[tuple[str, int, str]]:
    """(relative path, size, sha256) of every file `folder`'s manifest lists."""
    manifest = Path(folder) / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{folder} has no {MANIFEST}: it was never sealed (a save cut short, or files copied "
                              "without it), so its files cannot be checked")
    try:
        listed = json.loads(manifest.read_text())
        return [(str(rel), int(size), str(digest)) for rel, (size, digest) in listed.items()]
    except (ValueError, TypeError, AttributeError, OSError):
        raise CheckpointError(f"{manifest} is not a valid manifest") from None


def verify_listed(folder: Path) -> list[Path]:
    """The files `folder`'s manifest lists, once each is there, whole and unaltered (else CheckpointError)."""
    root, files = Path(folder).resolve(), []
    for rel, size, digest in read_manifest(folder):
        file = Path(folder) / rel
        if root not in file.resolve().parents:
            raise CheckpointError(f"{Path(folder) / MANIFEST} lists {rel!r}, outside the checkpoint")
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        if file.stat().st_size != size:
            raise CheckpointError(f"{file} has {file.stat().st_size} bytes, {size} were written")
        if sha256(file) != digest:
            raise CheckpointError(f"{file} does not match its sha256")
        files.append(file)
    return files


def verify_files(path: Path) -> list[Path]:
    """The files of checkpoint folder `path`, once it has a manifest that lists state.pt and every file it lists
    is there, whole and unaltered (else CheckpointError)."""
    files = verify_listed(path)
    if Path(path) / STATE_FILE not in files:
        raise CheckpointError(f"{Path(path) / MANIFEST} does not list {STATE_FILE}")
    return files


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `latest` points at, else the newest one with a state.pt, else None (for tools and people;
    resuming picks the newest that verifies, ddaebm/checkpoint/select.py)."""
    root = checkpoint_root(run_dir)
    pointer = root / POINTER
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if (target / STATE_FILE).is_file():
            return target
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def write_pointer(run_dir: Path) -> None:
    """`latest` names the newest sealed checkpoint (removed when there is none). Best effort: nothing trusts it."""
    pointer = checkpoint_root(run_dir) / POINTER
    sealed = sealed_checkpoints(run_dir)
    try:
        if sealed:
            write_atomic(pointer, sealed[-1].name + "\n")
        else:
            pointer.unlink(missing_ok=True)
    except OSError:
        pass


def set_aside(path: Path, kind: str, why: str) -> Path:
    """Move checkpoint folder `path` to checkpoints/<kind>/ (kind: CORRUPT or SUPERSEDED) with a WHY.txt, so it
    neither resumes nor counts in pruning, but nothing is deleted."""
    dest_root = Path(path).parent / kind
    dest_root.mkdir(exist_ok=True)
    dest, n = dest_root / Path(path).name, 1
    while dest.exists():
        n += 1
        dest = dest_root / f"{Path(path).name}-{n}"
    os.replace(path, dest)
    try:
        (dest / WHY).write_text(why + "\n")
    except OSError:
        pass
    return dest


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Remove what writers killed halfway left behind (temporary checkpoint folders, atomic-write temporaries, a
    universal conversion in progress). Only the run dir's lock holder may call this: nobody else writes there."""
    run_dir, removed = Path(run_dir), []
    root = checkpoint_root(run_dir)
    places = [run_dir, root, run_dir / "snapshots"]
    for folder in places:
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if (folder == root and _TMP_DIR.match(p.name)) or _ATOMIC_TMP.match(p.name):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
    for ckpt in step_folders(run_dir):
        engines = ckpt / ENGINES
        for tmp in engines.glob(f"*/{_UNIVERSAL_TMP}") if engines.is_dir() else []:
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (its directory entry), where the filesystem allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
