"""Stopping a run on purpose: preemption signals and the exit codes a scheduler sees.

SIGTERM (SLURM's warning before a kill, Kubernetes' stop) and SIGUSR1 (SLURM `--signal=USR1@T`) set a flag;
the loop finishes the iteration in progress, checkpoints, and raises Preempted, which the CLI turns into
EXIT_PREEMPTED. Running the same command again resumes. `ddaebm train` catches both from the first line of its
start-up (`stop_signals` around the whole command; the loop's own block reuses that flag), so a signal that
arrives while the job starts (imports, the checkpoint's verification, DeepSpeed's set-up) stops it after its
first iteration with a checkpoint and exit 143, instead of killing it with the signal's default action.
"""

from __future__ import annotations

import contextlib
import signal
import threading

EXIT_PREEMPTED = 143
"""Exit status after a preemption signal was honoured and a checkpoint written (128 + SIGTERM, what a job
killed by SIGTERM reports, so requeue rules written for that apply unchanged)."""
EXIT_NONFINITE = 3
"""Exit status after train.max_nonfinite consecutive iterations with a NaN/Inf loss."""
EXIT_WRITE_FAILED = 4
"""Exit status when the run dir could not be written (a full disk, an I/O error, a permission): a checkpoint being
written is removed again, the earlier ones are intact, and the same command resumes once the cause is fixed."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    def __init__(self, step: int):
        super().__init__(f"preempted at step {step}; checkpoint written")
        self.step = step


class NonFiniteStop(RuntimeError):
    pass


class _Flag:
    def __init__(self):
        self.name: str | None = None

    def set(self, signum, _frame) -> None:
        self.name = signal.Signals(signum).name

    def is_set(self) -> bool:
        return self.name is not None


_active: _Flag | None = None  # the flag of the outermost stop_signals block, which inner blocks share


@contextlib.contextmanager
def stop_signals():
    """A flag that SIGTERM/SIGUSR1 set while the block runs; the previous handlers come back after it. Inside an
    enclosing block (the command line's, from its first line) the same flag, already set if a signal came."""
    global _active
    if _active is not None:
        yield _active
        return
    flag = _Flag()
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield flag
        return
    previous = {s: signal.signal(s, flag.set) for s in STOP_SIGNALS}
    _active = flag
    try:
        yield flag
    finally:
        _active = None
        for s, handler in previous.items():
            signal.signal(s, handler)
