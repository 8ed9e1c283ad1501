"""Files that appear whole or not at all: written under a temporary name, synced, then renamed into place."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` in one rename, never leaving a half-written file under its name."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_atomic(path: Path, text: str) -> None:
    write_atomic_bytes(path, text.encode())
