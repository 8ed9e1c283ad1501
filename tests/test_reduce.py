"""The gradient exchange of ddaebm/training/reduce.py on real processes (gloo): sums, flags, chunks, the same bits
on every rank, the fallback, and a dead or late peer failing fast instead of hanging."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

TIMEOUT = 120


def _worker(out: str, mode: str, directory: str, chunk: int) -> None:
    """One rank: build the reducer, exchange rank-dependent vectors, write what it got."""
    import torch.distributed as dist

    from ddaebm.training import reduce

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    shm = reduce.open_shared_memory_reducer(world, rank, timeout_s=2.0, chunk=chunk, directory=Path(directory))
    result = {"kind": None if shm is None else shm.kind, "leftover": sorted(os.listdir(directory))
              if os.path.isdir(directory) else None}
    g = torch.Generator().manual_seed(rank)
    grads = [torch.randn(3, 5, generator=g), torch.randn(17, generator=g) * 1e3, torch.randn(1, generator=g)]
    if mode == "dead" and rank == 1:
        os._exit(0)  # gone before the exchange
    if mode == "late" and rank == 1:
        time.sleep(6)
    reducer = shm if shm is not None else reduce.ProcessGroupReducer()
    try:
        t0 = time.monotonic()
        flags = reduce.reduce_gradients_and_flags(reducer, grads, torch.tensor([rank == 1, False, rank == world - 1]),
                                                  world)
        flags = [v > 0 for v in flags.tolist()]
        result.update(flags=flags, grads=[x.tolist() for x in grads], seconds=time.monotonic() - t0)
        # a second round through the other slot set
        twice = reduce.reduce_gradients_and_flags(reducer, [torch.full((40,), float(rank))], torch.zeros(1), world)
        result["second"] = [v > 0 for v in twice.tolist()]
    except RuntimeError as err:
        result.update(error=str(err), seconds=time.monotonic() - t0)
    Path(out).write_text(json.dumps(result))
    os._exit(0)  # a peer may be gone: do not wait in destroy_process_group


def _run(tmp_path: Path, world: int, mode: str = "ok", directory: str = "/dev/shm", chunk: int = 1 << 20) -> list:
    from ddaebm.distributed import free_port

    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world),
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    procs = []
    for rank in range(world):
        code = (f"import tests.test_reduce as t; t._worker({str(tmp_path / f'r{rank}.json')!r}, {mode!r}, "
                f"{directory!r}, {chunk})")
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=dict(env, RANK=str(rank))))
    for p in procs:
        p.wait(timeout=TIMEOUT)
    return [json.loads((tmp_path / f"r{r}.json").read_text()) if (tmp_path / f"r{r}.json").exists() else None
            for r in range(world)]


def _expected(world: int) -> list[torch.Tensor]:
    per_rank = []
    for rank in range(world):
        g = torch.Generator().manual_seed(rank)
        per_rank.append([torch.randn(3, 5, generator=g), torch.randn(17, generator=g) * 1e3,
                         torch.randn(1, generator=g)])
    out = []
    for i in range(3):
        acc = per_rank[0][i].clone()
        for rank in range(1, world):
            acc += per_rank[rank][i]
        out.append(acc / world)
    return out


@pytest.mark.parametrize("world,chunk", [(2, 1 << 20), (3, 7)])
def test_shared_memory_exchange_averages_in_rank_order_and_ors_flags(tmp_path, world, chunk):
    results = _run(tmp_path, world, chunk=chunk)
    expected = _expected(world)
    for r in results:
        assert r["kind"] == "shared_memory"
        assert not [f for f in r["leftover"] if f.startswith("ddaebm-grads-")]  # unlinked once mapped
        assert r["flags"] == [True, False, True]
        for got, want in zip(r["grads"], expected):
            assert torch.equal(torch.tensor(got), want)  # the same sum, in rank order, bit for bit
        assert r["second"] == [False]
    assert all(r["grads"] == results[0]["grads"] for r in results)


def test_process_group_fallback_when_no_shared_directory(tmp_path):
    results = _run(tmp_path, 2, directory=str(tmp_path / "missing"))
    expected = _expected(2)
    for r in results:
        assert r["kind"] is None  # every rank fell back together
        assert r["flags"] == [True, False, True]
        for got, want in zip(r["grads"], expected):
            torch.testing.assert_close(torch.tensor(got), want, rtol=1e-6, atol=1e-6)


def test_dead_peer_fails_fast(tmp_path):
    r0, _ = _run(tmp_path, 2, mode="dead")
    assert "exited before gradient exchange" in r0["error"]
    assert r0["seconds"] < 1.5  # found by its pid, before the 2 s timeout


def test_late_peer_times_out(tmp_path):
    r0, r1 = _run(tmp_path, 2, mode="late")
    assert "did not reach gradient exchange" in r0["error"]
    assert 1.9 < r0["seconds"] < 4
