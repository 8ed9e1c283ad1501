"""Which checkpoint a run continues from (or samples with), and tidying the run dir around that choice.

The rule: the newest *sealed* checkpoint (it has a manifest) whose files all match the manifest and whose
state.pt reads without running code wins; the `latest` pointer is not consulted (a kill between the rename and the
pointer write must not cost an interval). A checkpoint without a valid manifest is never chosen automatically; an
explicit `--resume PATH` may load one, with a warning. When checkpoints exist and none verifies, that is an error
(a job that silently restarted from step 0 would then have its new checkpoints outranked by the broken ones);
`--resume never` starts afresh instead. A checkpoint that names code is refused outright (state.py).

Selecting reads only. `tidy_run_dir`, called by the run dir's lock holder once it decided, sets aside the
checkpoints that did not verify (checkpoints/corrupt/), those newer than an explicit --resume
(checkpoints/superseded/), removes leftovers of killed writers, and rewrites `latest`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ddaebm.checkpoint.files import (CORRUPT, MANIFEST, SUPERSEDED, CheckpointError, CheckpointWarning,
                                     checkpoint_root, remove_leftovers, set_aside, step_folders, step_of,
                                     verify_files, write_pointer)
from ddaebm.checkpoint.state import UnsafeCheckpoint, load_state, scan_engine_files


@dataclass
class Selection:
    """A decision about a run dir: the checkpoint to continue from (None: start afresh) and what to set aside."""

    path: Path | None = None
    state: dict | None = None
    rejected: list[tuple[Path, str]] = field(default_factory=list)  # did not verify: to checkpoints/corrupt/
    superseded: list[Path] = field(default_factory=list)  # newer than an explicit --resume: to checkpoints/superseded/
    notes: list[str] = field(default_factory=list)  # warnings for the user, once the choice is accepted

    @property
    def step(self) -> int:
        return self.state["step"] if self.state is not None else 0


def verify_checkpoint(path: Path, engines: bool = False) -> dict:
    """The state of the sealed checkpoint folder `path` once its files match its manifest and state.pt (and with
    `engines`, every engine file DeepSpeed will unpickle) read without running code."""
    listed = verify_files(path)
    state = load_state(path)
    if engines:
        scan_engine_files(path, listed)
    return state


def select_checkpoint(run_dir: Path, resume: str = "auto", engines: bool = False, warn: bool = True) -> Selection:
    """The checkpoint to continue `run_dir` from: resume 'auto' (the newest that verifies; an error when some exist
    and none does), 'never' (none; an error when one verifies), or a checkpoint folder or state file. `engines`:
    the DeepSpeed files will be read too (scanned). `warn`: report each checkpoint skipped (the lock holder
    reports them when it sets them aside instead)."""
    if resume == "auto":
        return _newest(run_dir, engines, warn)
    if resume == "never":
        found = _scan(run_dir, engines, warn=False)
        if found.path is not None:
            raise CheckpointError(f"{run_dir} already holds checkpoints (newest that verifies: {found.path.name}); "
                                  "use --resume auto or another --run-dir")
        return found  # those that do not verify are set aside, and the run starts afresh
    return _explicit(run_dir, Path(resume), engines, warn)


def _scan(run_dir: Path, engines: bool, warn: bool) -> Selection:
    """The newest step folder that verifies, with the newer ones that do not (all of them when none does)."""
    rejected = []
    for path in reversed(step_folders(run_dir)):
        try:
            return Selection(path, verify_checkpoint(path, engines), rejected)
        except UnsafeCheckpoint:
            raise
        except CheckpointError as err:
            rejected.append((path, str(err)))
            if warn:
                warnings.warn(f"skipping checkpoint {path}: {err}", CheckpointWarning, stacklevel=4)
    return Selection(rejected=rejected)


def _newest(run_dir: Path, engines: bool, warn: bool) -> Selection:
    found = _scan(run_dir, engines, warn)
    if found.path is None and found.rejected:
        newest, why = found.rejected[0]
        raise CheckpointError(f"{run_dir}: none of its {len(found.rejected)} checkpoint(s) verifies (newest, "
                              f"{newest.name}: {why}); restore one, or start afresh with `ddaebm train --resume "
                              f"never`, which moves them to {checkpoint_root(run_dir) / CORRUPT}/")
    return found


def _explicit(run_dir: Path, path: Path, engines: bool, warn: bool) -> Selection:
    if not path.exists():
        raise CheckpointError(f"--resume {path}: no such checkpoint")
    notes = []
    if path.is_dir() and (path / MANIFEST).is_file():
        state = verify_checkpoint(path, engines)
    else:
        state = load_state(path)
        if engines and path.is_dir():
            scan_engine_files(path)
        notes.append(f"--resume {path}: no {MANIFEST} beside it, so its files cannot be checked; loading it as asked")
    folder = path if path.is_dir() else path.parent
    newer = [p for p in step_folders(run_dir) if step_of(p) > state["step"] and p.resolve() != folder.resolve()]
    return Selection(path, state, superseded=newer, notes=notes)


def newest_valid_checkpoint(run_dir: Path, warn: bool = True) -> tuple[Path, dict] | None:
    """(path, state) of the newest checkpoint that verifies, None when the run has none; an error when it has some
    and none verifies. For sampling and evaluation (read only)."""
    found = _newest(run_dir, engines=False, warn=warn)
    return None if found.path is None else (found.path, found.state)


def tidy_run_dir(run_dir: Path, selection: Selection) -> list[str]:
    """Set aside what `selection` rejected or superseded, remove killed writers' leftovers, rewrite `latest`. Only
    the run dir's lock holder calls this. One line per change, to report."""
    notes = list(selection.notes)
    for path, why in selection.rejected:
        dest = set_aside(path, CORRUPT, why)
        notes.append(f"checkpoint {path.name} does not verify ({why}): set aside as {dest}")
    for path in selection.superseded:
        dest = set_aside(path, SUPERSEDED, f"newer than {selection.path}, which --resume continued from")
        notes.append(f"checkpoint {path.name} is newer than --resume {selection.path}: set aside as {dest}")
    for leftover in remove_leftovers(run_dir):
        notes.append(f"removed {leftover} (left by a writer that was killed)")
    if len(notes) > len(selection.notes):
        write_pointer(run_dir)
    return notes
