"""The run directory as a place: its path checked before anything is written, and one writer at a time.

`RunLock` is an exclusive `fcntl.flock` on `RUN_DIR/lock`, held for the life of a training job by the process
that writes the run dir (rank 0 under a launcher); the file records the holder's host, pid and job id, so a second
trainer on the same directory stops with one line naming it. The kernel releases a flock when its holder dies
(kill -9, OOM killer, node reboot of a local disk), so no stale lock ever needs removing by hand; the file stays
behind after such a death, harmlessly (it is a record, the lock is the flock on it).

Shared filesystems: on NFS (v4, or v3 with lockd) Linux turns flock into a whole-file POSIX lock that every
client sees, so two trainers on two hosts exclude each other; a lock held by a host that dies is released when
the server's lease for it expires (NFSv4: ~90 s). Lustre does the same when mounted with `-o flock`; with
`-o localflock` the lock only excludes trainers on the same node, and with `noflock` (or NFS mounted `nolock`)
flock fails: the trainer then warns once and runs without the lock (nothing else changes).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from ddaebm.errors import BadInput

LOCK_FILE = "lock"
_JOB_VARS = ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "RAY_JOB_ID", "PBS_JOBID", "LSB_JOBID")


class RunDirBusy(BadInput):
    """Another trainer holds the run directory's lock."""


def checked_run_dir(arg: str | None, default: Path) -> Path:
    """The run directory `--run-dir` names (or the default), refused with its argument's name when it is empty, a
    file, under a file, or in a folder this process cannot write. Reads only."""
    if arg is not None and not arg.strip():
        raise BadInput("--run-dir is empty: name a folder (the default is runs/<config name>)")
    path = Path(arg) if arg is not None else default
    shown = f"--run-dir {arg}" if arg is not None else f"run dir {path} (the default)"
    if path.exists() and not path.is_dir():
        raise BadInput(f"{shown} is a file, not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise BadInput(f"{shown}: {existing} is a file, so the folder cannot be made")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BadInput(f"{shown}: no permission to write in {existing}")
    return path


class RunLock:
    """The exclusive lock of one run directory (see the module docstring). `acquire` raises RunDirBusy naming the
    holder; `release` removes the file while still holding the lock, so a late opener retries on a new one."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None
        self.unsupported = False

    @property
    def held(self) -> bool:
        return self.fd is not None or self.unsupported

    def acquire(self) -> None:
        """Take the lock (the run dir must exist); idempotent."""
        while self.fd is None and not self.unsupported:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RunDirBusy(f"{self.path.parent} is in use by another trainer ({self._holder()}); wait for "
                                     "it to end, or use another --run-dir") from None
                if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF):
                    print(f"ddaebm: warning: {self.path}: this filesystem does not support flock ({err.strerror}); "
                          "running without the run dir lock", file=sys.stderr)
                    self.unsupported = True
                    return
                raise
            if self._same_file(fd):
                self.fd = fd
            else:  # the previous holder removed the file between our open and our lock: lock the new one
                os.close(fd)

    def _same_file(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def record(self) -> None:
        """Write who holds the lock (host, pid, job id, start time) into the lock file."""
        if self.fd is None:
            return
        job = next((f"{v}={os.environ[v]}" for v in _JOB_VARS if os.environ.get(v)), None)
        info = {"host": socket.gethostname(), "pid": os.getpid(), "job": job,
                "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv[1:6]}
        data = (json.dumps(info) + "\n").encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def _holder(self) -> str:
        try:
            info = json.loads(self.path.read_text())
            return ", ".join(f"{k} {info[k]}" for k in ("host", "pid", "job", "since") if info.get(k))
        except (OSError, ValueError, TypeError, AttributeError):
            return "holder not yet recorded"

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if self._same_file(self.fd):
                self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)  # closing the descriptor releases the flock
        self.fd = None
