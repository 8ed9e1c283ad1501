"""Shared measuring tools of the bench scripts: FLOP counting that survives autograd.grad, timing, peak RSS."""

from __future__ import annotations

import resource
import statistics
import time

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from ddaebm.fastpath import cpu


class FlopCount(TorchDispatchMode):
    """Counts FLOPs with torch.utils.flop_counter's formulas (matmuls, convolutions) at the dispatch level.

    FlopCounterMode itself installs module hooks that break torch.autograd.grad (the R1 penalty).
    """

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        elif func is cpu._linear_onednn:  # product's x·wᵀ (+ bias), which torch's registry does not know
            x, w = args[0], args[1]
            self.total += 2 * x.numel() // x.shape[-1] * w.shape[0] * w.shape[1]
        return out


def flops_of(fn) -> int:
    with FlopCount() as counter:
        fn()
    return counter.total


def timed(fn, iters: int, warmup: int) -> list[float]:
    """Seconds of each of `iters` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median_ms(fn, iters: int, warmup: int) -> float:
    return 1000 * statistics.median(timed(fn, iters, warmup))


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
