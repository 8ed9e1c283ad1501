"""Gradient averaging across ranks that also carries the iteration's yes/no decisions, in one exchange per phase.

Every phase of a multi-rank iteration needs two things from the other ranks: the average of the gradients, and
an agreement on flags that must be the same everywhere (a NaN/Inf loss on any rank skips the update on all; a
stop signal on any rank stops all at the same step). Sent separately they are two synchronisations per phase,
and on CPU ranks each synchronisation, not the data, is what costs: a gloo collective between two busy
processes waits for its transport threads to wake, a few percent of a toy iteration each time (bench/README.md).
Here the flags ride at the end of the flattened gradients:

- `SharedMemoryReducer`: all ranks on one host (the usual CPU case: one node, one rank per core group). Each
  rank writes its vector into its slot of a shared-memory file, publishes a sequence number, spins (napping
  once the wait grows past 20 ms) until every rank published, and sums the slots in rank order, so every rank
  computes the bit-identical sum. Two slot sets alternate, so a rank may write round n+1 while a slower one
  still reads round n. A peer that does not arrive within the process group's timeout (or whose process is
  gone) raises instead of hanging.
- `ProcessGroupReducer`: anywhere else (several hosts, a /dev/shm too small or not shared): one all-reduce of
  the same flat vector.

Both return the gradients summed (the caller divides by the world size) and the flags OR-ed. Sums are of
float32 values. The shared-memory path relies on x86-64's store ordering (a slot's data is visible before the
sequence number written after it), so it is used only there.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

SHM_DIR = Path("/dev/shm")
# Elements per slot: larger vectors go through in chunks, so the shared file stays small (2 · world · 4 MiB)
# whatever the model size.
CHUNK = 1 << 20


def _header_len(world: int) -> int:
    """int64 entries before the slots: [0, world) sequence numbers, [world, 2·world) process ids, padded to 64
    bytes."""
    return -(-2 * world // 8) * 8


class ProcessGroupReducer:
    """The flat vector all-reduced (sum) by the default process group."""

    kind = "process_group"

    def all_reduce_(self, flat: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(flat)
        return flat


class SharedMemoryReducer:
    """Sum of every rank's float32 vector through a shared-memory file (module docstring). Build it on all
    ranks at once with `open_shared_memory_reducer`, which also checks that the file really is shared."""

    kind = "shared_memory"

    def __init__(self, buffer: torch.Tensor, rank: int, world: int, timeout_s: float, chunk: int):
        self.rank, self.world, self.timeout_s, self.chunk = rank, world, timeout_s, chunk
        header = _header_len(world)
        self.header = buffer[:header]
        self.slots = buffer[header:].view(torch.float32).view(2, world, chunk)
        self.seq = 0
        self.pids = [int(p) for p in self.header[world:2 * world]]

    def all_reduce_(self, flat: torch.Tensor) -> torch.Tensor:
        if flat.dtype != torch.float32 or flat.device.type != "cpu" or flat.dim() != 1:
            raise ValueError(f"shared-memory reduction takes a flat float32 CPU vector, got {flat.dtype} "
                             f"{tuple(flat.shape)} on {flat.device}")
        for start in range(0, flat.numel(), self.chunk):
            self._round(flat[start:start + self.chunk])
        return flat

    def _round(self, part: torch.Tensor) -> None:
        self.seq += 1
        n = part.numel()
        slots = self.slots[self.seq % 2, :, :n]
        slots[self.rank].copy_(part)
        self.header[self.rank] = self.seq  # after the data: x86-64 keeps the two stores in this order
        self._wait_for_peers()
        part.copy_(slots[0])
        for j in range(1, self.world):  # rank order on every rank: the same rounding everywhere
            part.add_(slots[j])

    def _wait_for_peers(self) -> None:
        published = self.header[:self.world]
        spins, deadline, next_check, nap_after = 0, None, 0.0, 0.0
        while not bool((published >= self.seq).all()):
            spins += 1
            if spins < 2000:
                continue
            now = time.monotonic()
            if deadline is None:
                deadline, next_check, nap_after = now + self.timeout_s, now + 0.1, now + 0.02
            # Spinning answers within microseconds; a long wait (a peer writing a snapshot or checkpoint) sleeps
            # in short naps instead, leaving the core to others.
            if now >= nap_after:
                time.sleep(2e-4)
            else:
                os.sched_yield()
            if now >= next_check:
                next_check = now + 0.1
                self._check_peers_alive(published)
                if now >= deadline:
                    late = [j for j in range(self.world) if int(published[j]) < self.seq]
                    raise RuntimeError(f"rank {self.rank}: ranks {late} did not reach gradient exchange {self.seq} "
                                       f"within dist.timeout_s={self.timeout_s:g} s")

    def _check_peers_alive(self, published: torch.Tensor) -> None:
        for j, pid in enumerate(self.pids):
            if int(published[j]) < self.seq and not _alive(pid):
                raise RuntimeError(f"rank {self.rank}: rank {j} (pid {pid}) exited before gradient exchange "
                                   f"{self.seq}")


def _alive(pid: int) -> bool:
    """Whether process `pid` still runs: a zombie (exited, not yet reaped by its launcher) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _agree(ok: bool) -> bool:
    """True on every rank when `ok` holds on every rank (a setup step all must take or skip together)."""
    t = torch.tensor([0.0 if ok else 1.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item() == 0


def open_shared_memory_reducer(world: int, rank: int, timeout_s: float,
                               chunk: int = CHUNK, directory: Path = SHM_DIR) -> SharedMemoryReducer | None:
    """Collective: a SharedMemoryReducer when every rank sees the same file in `directory` (same host and IPC
    namespace, enough space) on x86-64, else None on every rank. The file is removed once all ranks mapped it,
    so nothing is left behind, however the run ends."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    nbytes = _header_len(world) * 8 + 2 * world * chunk * 4
    name, error = [None], None
    if rank == 0 and x86:
        try:
            fd, path = tempfile.mkstemp(prefix="ddaebm-grads-", dir=directory)
            try:
                os.posix_fallocate(fd, 0, nbytes)  # reserve the pages now: a full tmpfs would SIGBUS later
            finally:
                os.close(fd)
            name[0] = path
        except OSError as err:
            error = err
    dist.broadcast_object_list(name, src=0)
    buffer, ok = None, name[0] is not None and x86
    if ok:
        try:
            buffer = torch.from_file(name[0], shared=True, size=nbytes // 8, dtype=torch.int64)
            if rank == 0:
                buffer[:_header_len(world)].zero_()
        except (OSError, RuntimeError) as err:
            ok, error = False, err
    ok = _agree(ok)
    if ok:  # each rank writes its pid; all must read back every other rank's: the file is truly shared
        buffer[world + rank] = os.getpid()
        dist.barrier()
        ok = _agree(all(int(buffer[world + j]) > 0 for j in range(world)))
    if rank == 0 and name[0] is not None:  # every rank has mapped it (or given up) by now
        os.unlink(name[0])
    dist.barrier()
    if not ok:
        if rank == 0 and error is not None:
            print(f"ddaebm: shared-memory gradient exchange unavailable ({error}); using the process group")
        return None
    return SharedMemoryReducer(buffer, rank, world, timeout_s, chunk)


def build_reducer(world: int, rank: int, timeout: timedelta | float):
    """The fastest reducer that works between these ranks (collective; the same kind on every rank)."""
    timeout_s = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)
    if dist.get_backend() == "gloo":
        shm = open_shared_memory_reducer(world, rank, timeout_s)
        if shm is not None:
            return shm
    return ProcessGroupReducer()


def reduce_gradients_and_flags(reducer, grads: list[torch.Tensor], flags: torch.Tensor, world: int) -> torch.Tensor:
    """Average `grads` (in place) over ranks and OR `flags` (0/1 values), in one exchange; returns the agreed
    flags as 0/1 float32."""
    flat = torch.cat([*(g.reshape(-1).float() for g in grads), flags.float().reshape(-1)])
    reducer.all_reduce_(flat)
    agreed = (flat[flat.numel() - flags.numel():] > 0).float()
    if grads:
        sizes = [g.numel() for g in grads]
        summed = flat[:sum(sizes)].div_(world).split(sizes)
        torch._foreach_copy_(grads, [s.view_as(g) for s, g in zip(summed, grads)])
    return agreed


