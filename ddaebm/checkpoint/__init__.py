"""Checkpoints in the run directory: `checkpoints/step-NNNNNNNNN/` folders, sealed by a manifest.

- files.py: the layout (names, listing, manifests, `latest`, folders set aside, leftovers of killed writers);
- state.py: what a checkpoint may hold and reading it without running code (`weights_only`);
- write.py: writing one on every rank, sealing and pruning it, and a failed write as one error on all ranks;
- select.py: which checkpoint a run continues from, and tidying the run dir around that choice.
"""

from ddaebm.checkpoint.files import (CORRUPT, ENGINES, MANIFEST, POINTER, STATE_FILE, SUPERSEDED,  # noqa: F401
                                     CheckpointError, CheckpointWarning, checkpoint_root, complete_checkpoints,
                                     latest_checkpoint, sealed_checkpoints, step_folders, step_of, verify_listed,
                                     write_manifest)
from ddaebm.checkpoint.select import (Selection, newest_valid_checkpoint, select_checkpoint,  # noqa: F401
                                      tidy_run_dir, verify_checkpoint)
from ddaebm.checkpoint.state import UnsafeCheckpoint, load_state, scan_engine_files, scan_files  # noqa: F401
from ddaebm.checkpoint.write import CheckpointWriteError, prune, save_checkpoint  # noqa: F401

load_checkpoint = load_state  # the name callers used before the split
