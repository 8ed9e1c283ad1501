"""Toy training-iteration speed: median ms per iteration, FLOPs, fraction of matmul peak, peak RSS.

    python bench/toy_step.py [--config configs/toy/25gaussians.yaml] [--iters 300] [--threads 1]

Prints, for the project's trainer, for the same trainer with the toy fast path off ("generic": autograd through
the toy networks, R1 by double backward; ddaebm/fastpath/) and for a straightforward baseline of the same
math built in the same run (ATen's PReLU, the literal concatenated first layer, unfused Adam, R1 through autograd of
the full conditional, toy data from Python loops as in the official code), the median time of one iteration after
warm-up; these three run the reference's math (REFERENCE_MATH: ddaebm's NCE density term and energy base
measure off, k uniform, one R1 γ for every step). When the config departs from it, the config as it trains is
timed too ("as configured"). The physical limit is the FLOPs one iteration performs (torch.utils.flop_counter's
formulas: matmuls only) divided by the measured single-core throughput of a 200×300×300 fp32 matmul (measured
before each round, the fastest kept).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import flops_of  # noqa: E402
from ddaebm.config import load_config  # noqa: E402
from ddaebm.diffusion.schedule import log_transition  # noqa: E402
from ddaebm.losses import draw_step_batch, generator_loss  # noqa: E402
from ddaebm.losses import GENERIC  # noqa: E402
from ddaebm.training.perf import retain_freed_heap_memory  # noqa: E402
from ddaebm.networks.layers import PReLU  # noqa: E402
from ddaebm.networks.toy import BranchedInput  # noqa: E402
from ddaebm.training.trainer import Trainer  # noqa: E402


def median_ms(fn, iters: int, warmup: int, cpu: bool = False):
    """Median wall-clock ms of fn; with cpu, also the median CPU time of this process (what a shared, busy
    machine's preemptions leave out of the wall time)."""
    for _ in range(warmup):
        fn()
    wall, cpu_times = [], []
    for _ in range(iters):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    if cpu:
        return 1000 * statistics.median(wall), 1000 * statistics.median(cpu_times)
    return 1000 * statistics.median(wall)


def matmul_gflops(m: int = 200, k: int = 300, n: int = 300, iters: int = 2000) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    ms = median_ms(lambda: torch.mm(a, b), iters, 200)
    return 2 * m * k * n / (ms * 1e-3) / 1e9


def python_loop_25gaussians(batch: int) -> torch.Tensor:
    """The official toy data path: points built in Python loops (method.md §9), for the baseline only."""
    import random

    centres = [(2 * i, 2 * j) for i in range(-2, 3) for j in range(-2, 3)]
    pts = []
    for _ in range(40):
        for cx, cy in centres:
            pts.append([cx + 0.1 * random.gauss(0, 1), cy + 0.1 * random.gauss(0, 1)])
    pts = pts[:batch]
    random.shuffle(pts)
    return torch.tensor(pts, dtype=torch.float32) / 2.828


class BaselineStep:
    """The same iteration built the plain way, to measure what the trainer's choices buy."""

    def __init__(self, trainer: Trainer):
        self.t = trainer
        self.energy = copy.deepcopy(trainer.energy)
        self.gen_enc = copy.deepcopy(trainer.gen_enc)
        for module in (self.energy, self.gen_enc):
            for child in list(module.modules()):
                for attr, sub in list(child.named_children()):
                    if isinstance(sub, PReLU):  # ATen's PReLU instead of the float-only backward
                        setattr(child, attr, nn.PReLU())
                if isinstance(child, BranchedInput):  # the literal concatenation instead of the folded layer
                    child.forward = child.direct
        o = trainer.cfg.optim
        self.opt_d = torch.optim.Adam(self.energy.parameters(), lr=o.lr_d, betas=(o.beta1, o.beta2), foreach=False)
        self.opt_g = torch.optim.Adam(self.gen_enc.parameters(), lr=o.lr_g, betas=(o.beta1, o.beta2), foreach=False)
        self.rng = torch.Generator().manual_seed(0)

    def __call__(self) -> None:
        t, s, cfg = self.t, self.t.schedule, self.t.cfg.loss
        x0 = python_loop_25gaussians(t.cfg.data.batch)
        self.energy.requires_grad_(True)
        b = draw_step_batch(x0, s, self.gen_enc.generator, t.terms, t.cfg.model.nz, self.rng)
        f_real = self.energy(b.x_k, b.k)
        f_fake = self.energy(b.x_fake.detach(), b.k)
        cond = f_real + log_transition(s, b.x_k, b.x_k1, b.k)
        (grad,) = torch.autograd.grad(cond.sum(), b.x_k, create_graph=True)
        loss_d = -f_real.mean() + f_fake.mean() + 0.5 * cfg.r1_gamma * grad.pow(2).sum(1).mean()
        self.opt_d.zero_grad()
        loss_d.backward()
        self.opt_d.step()
        self.energy.requires_grad_(False)
        loss_g, _ = generator_loss(self.energy, self.gen_enc, s, b, cfg, t.terms)
        self.opt_g.zero_grad()
        loss_g.backward()
        self.opt_g.step()


REFERENCE_MATH = ["loss.nce_weight=0", "model.energy_base_std=0", "loss.step_probs=null",
                  "loss.r1_gamma_scale=null"]


def measure(which: str, config: str, iters: int, warmup: int) -> dict:
    """ms/it, FLOPs and peak RSS of one implementation, in this (fresh) process. All but "default" run the
    reference's math (REFERENCE_MATH)."""
    retain_freed_heap_memory()  # as `ddaebm train` runs (training/perf.py)
    cfg = load_config(config, [] if which == "default" else REFERENCE_MATH)
    trainer = Trainer(cfg, objectives=GENERIC) if which == "generic" else Trainer(cfg)
    step = BaselineStep(trainer) if which == "baseline" else trainer.train_step
    flops = flops_of(step)
    ms, cpu_ms = median_ms(step, iters, warmup, cpu=True)
    return {"ms": ms, "cpu_ms": cpu_ms, "flops": flops,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure_in_child(which: str, args) -> dict:
    """Each measurement in its own process: two models in one process share caches and allocator state, which
    measurably slows whichever runs second."""
    cmd = [sys.executable, __file__, "--child", which, "--config", args.config, "--iters", str(args.iters),
           "--warmup", str(args.warmup), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/toy/25gaussians.yaml")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5, help="alternating measurements of each")
    p.add_argument("--child", choices=("ddaebm", "generic", "baseline", "default"), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure(args.child, args.config, args.iters, args.warmup)))
        return
    # Alternate them so that a busy second core slows all alike.
    runs = {"ddaebm": [], "generic": [], "baseline": []}
    if load_config(args.config) != load_config(args.config, REFERENCE_MATH):  # the config as it trains
        runs["default"] = []
    throughputs = []  # the matmul's, before each round: the fastest is the core's (a busy moment reads low)
    for _ in range(args.rounds):
        throughputs.append(matmul_gflops())
        for which in runs:
            runs[which].append(measure_in_child(which, args))
    peak = max(throughputs)
    ours, base = runs["ddaebm"], runs["baseline"]
    ms, base_ms = statistics.median(r["ms"] for r in ours), statistics.median(r["ms"] for r in base)
    generic_ms = statistics.median(r["ms"] for r in runs["generic"])
    cpu = {which: statistics.median(r["cpu_ms"] for r in rs) for which, rs in runs.items()}
    flops, base_flops = ours[0]["flops"], base[0]["flops"]
    limit_ms = flops / (peak * 1e9) * 1e3
    print(f"config            {args.config}  (threads {args.threads}, {args.rounds} rounds of {args.iters} iterations)")
    print(f"matmul 200x300x300 {peak:.1f} GFLOP/s on this core (the fastest of {len(throughputs)}: "
          f"{', '.join(f'{g:.0f}' for g in throughputs)})")
    print(f"FLOPs / iteration {flops / 1e9:.3f} GFLOP (baseline {base_flops / 1e9:.3f})")
    print(f"limit             {limit_ms:.2f} ms/it at that throughput")
    rounds = {which: ", ".join(f"{r['ms']:.2f}" for r in rs) for which, rs in runs.items()}
    print(f"ddaebm            {ms:.2f} ms/it   {flops / (ms * 1e-3) / 1e9:.1f} GFLOP/s = "
          f"{100 * limit_ms / ms:.0f}% of the matmul limit   (rounds: {rounds['ddaebm']})")
    print(f"generic           {generic_ms:.2f} ms/it   (rounds: {rounds['generic']})")
    print(f"baseline          {base_ms:.2f} ms/it   (rounds: {rounds['baseline']})")
    print(f"speed-up          {base_ms / ms:.2f}x over the baseline, {generic_ms / ms:.2f}x over generic")
    # The machine drifts between rounds; each round times the three back to back, so their ratio within a round
    # is steadier than the ratio of medians over rounds.
    ratios = [b["ms"] / o["ms"] for o, b in zip(ours, base)]
    print(f"per round         baseline / ddaebm {statistics.median(ratios):.2f}x (median; rounds: "
          f"{', '.join(f'{r:.2f}' for r in ratios)}); fastest ddaebm round {min(r['ms'] for r in ours):.2f} ms/it")
    if "default" in runs:
        d = runs["default"]
        d_ms = statistics.median(r["ms"] for r in d)
        print(f"as configured     {d_ms:.2f} ms/it   {d[0]['flops'] / 1e9:.3f} GFLOP/it   (NCE rows, step_probs, "
              f"per-step γ as the config sets them; the rows above run {' '.join(REFERENCE_MATH)}; "
              f"rounds: {rounds['default']})")
    print(f"CPU time / it     ddaebm {cpu['ddaebm']:.2f} ms, generic {cpu['generic']:.2f} ms, baseline "
          f"{cpu['baseline']:.2f} ms: {cpu['baseline'] / cpu['ddaebm']:.2f}x, {cpu['generic'] / cpu['ddaebm']:.2f}x")
    rss = {which: max(r["rss_mb"] for r in rs) for which, rs in runs.items()}
    print(f"peak RSS          {rss['ddaebm']:.0f} MB (generic {rss['generic']:.0f} MB, "
          f"baseline {rss['baseline']:.0f} MB)")
    if not math.isfinite(ms):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
