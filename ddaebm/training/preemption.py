"""Stopping a run on purpose: preemption signals and the exit codes a scheduler sees.

SIGTERM (SLURM's warning before a kill, Kubernetes' stop) and SIGUSR1 (SLURM `--signal=USR1@T`) set a flag;
the loop finishes the iteration in progress, checkpoints, and raises Preempted, which the CLI turns into
EXIT_PREEMPTED. Running the same command again resumes.
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


@contextlib.contextmanager
def stop_signals():
    """A flag that SIGTERM/SIGUSR1 set while the block runs; the previous handlers come back after it."""
    flag = _Flag()
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield flag
        return
    previous = {s: signal.signal(s, flag.set) for s in STOP_SIGNALS}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
