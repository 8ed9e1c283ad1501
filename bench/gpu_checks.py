"""The checks of bench/gpu_check.py, one function each: ctx (device, quick, tmp) -> the fields of its JSON row.

Each raises Skip where its hardware is missing. Sizes: the full ones fit one H100/H200 in ≤ 8 minutes all
together; `ctx.quick` shrinks everything to toy size for a CPU dry run.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# Dense peak throughput per device and precision, for MFU (NVIDIA's data sheets, SXM parts).
PEAK_FLOPS = {"H100": {"fp32": 67e12, "tf32": 495e12, "bf16": 989e12},
              "H200": {"fp32": 67e12, "tf32": 495e12, "bf16": 989e12}}
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


class Skip(Exception):
    """This check needs hardware or a package this machine lacks."""


class Images:
    """Random images on a device, batch i from seed i: cheap, and a restored stream draws exactly what the
    uninterrupted one would."""

    def __init__(self, shape, batch: int, device: torch.device):
        self.shape, self.batch, self.device, self.i = tuple(shape), batch, device, 0

    def next_batch(self) -> torch.Tensor:
        g = torch.Generator(device=self.device).manual_seed(self.i)
        self.i += 1
        return torch.rand((self.batch, *self.shape), generator=g, device=self.device) * 2 - 1

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = state["i"]


def config(name: str, ctx, *overrides):
    from ddaebm.config import load_config

    return load_config(ROOT / "configs" / name, ["data.root=unused", f"dist.device={ctx.device.type}",
                                                 "train.threads=0", *overrides])


def trainer(cfg, ctx, **kw):
    from ddaebm.training.trainer import Trainer

    t = Trainer(cfg, **kw)
    t._stream = Images(t.model.data_shape, cfg.data.batch, t.device)
    return t


def sync(ctx) -> None:
    if ctx.cuda:
        torch.cuda.synchronize()


def seconds_per_step(t, ctx, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        t.train_step()
    sync(ctx)
    t0 = time.perf_counter()
    for _ in range(steps):
        t.train_step()
    sync(ctx)
    return (time.perf_counter() - t0) / steps


def flat_weights(module) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten().cpu() for p in module.parameters()])


# ---- the checks


def stats_contract(ctx) -> dict:
    """The crash of the first multi-GPU log step: every stat on the device, stacked for one (emulated) reduce."""
    from ddaebm.training.monitor import Monitor

    t = trainer(config("tiny/cifar10.yaml", ctx), ctx)
    (ctx.tmp / "stats").mkdir()
    monitor = Monitor(ctx.tmp / "stats", 2, 0, t.cfg.data.batch, 1, enabled=False, reduce=lambda x: x)
    for step in (1, 2):
        stats = t.train_step()
        monitor.record(stats)
        row = monitor.step_done(step)
    return {"devices": sorted({str(v.device) for v in stats.values()}), "keys": len(row)}


def deepspeed_stages(ctx) -> dict:
    """DeepSpeed on one rank: ZeRO 0/1/2 × fp32/bf16 train the same weights (5 steps, relative max difference
    to ZeRO 0 of the same precision; tolerance 1e-5)."""
    names = ["tiny/lsun_church128.yaml"] + ([] if ctx.quick else ["cifar10.yaml"])
    out = {}
    for name in names:
        for precision in ("fp32", "bf16") if ctx.cuda or not ctx.quick else ("fp32",):
            weights = {}
            for stage in (0, 1, 2):
                cfg = config(name, ctx, "dist.backend=deepspeed", f"dist.zero_stage={stage}",
                             f"dist.precision={precision}", "optim.ema_decay=0",
                             "data.batch=2" if ctx.quick else "data.batch=16")
                t = trainer(cfg, ctx)
                for _ in range(2 if ctx.quick else 5):
                    t.train_step()
                weights[stage] = flat_weights(t.model.energy)
                del t
            scale = weights[0].abs().max()
            diffs = {f"zero{s}": float((weights[s] - weights[0]).abs().max() / scale) for s in (1, 2)}
            out[f"{name}:{precision}"] = {**diffs, "agree": max(diffs.values()) <= 1e-5}
    return out


def fp16(ctx) -> dict:
    """DeepSpeed's fp16 with dynamic loss scaling and R1's double backward, ZeRO 0: overflow steps skipped."""
    if not ctx.cuda:
        raise Skip("fp16 needs a GPU")
    cfg = config("tiny/lsun_church128.yaml" if ctx.quick else "cifar10.yaml", ctx, "dist.backend=deepspeed",
                 "dist.zero_stage=0", "dist.precision=fp16", "data.batch=16")
    t = trainer(cfg, ctx)
    steps = 12
    for _ in range(steps):
        stats = t.train_step()
    skipped = sum(getattr(e.engine, "skipped_steps", 0) for e in t.engines.values())
    return {"steps": steps, "overflow_skipped": int(skipped), "losses_finite": all(
        bool(torch.isfinite(v)) for v in stats.values()), "f_real": float(stats["f_real"])}


def lsun_speed(ctx) -> dict:
    """The real LSUN 128 config (DDPM++, per-GPU batch 12 as configured): s/it, img/s, peak memory, MFU, with
    cuDNN's autotuner on and off."""
    from bench.common import flops_of
    from ddaebm.training.perf import apply_gpu_settings

    name, batch = ("tiny/lsun_church128.yaml", 2) if ctx.quick else ("lsun_church128.yaml", 12)
    out = {}
    for benchmark in (True, False):
        apply_gpu_settings(benchmark, False)
        t = trainer(config(name, ctx, f"data.batch={batch}"), ctx)
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats()
        s = seconds_per_step(t, ctx, 1 if ctx.quick else 8)
        row = {"s_per_it": round(s, 4), "img_per_s": round(batch / s, 1)}
        if ctx.cuda:
            row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if benchmark:
            flops = flops_of(t.train_step)
            peak = next((v["fp32"] for k, v in PEAK_FLOPS.items() if k in torch.cuda.get_device_name(0)), None) \
                if ctx.cuda else None
            row.update(gflop_per_it=round(flops / 1e9, 1), mfu_fp32=round(flops / s / peak, 3) if peak else None)
        out[f"cudnn_benchmark_{benchmark}".lower()] = row
        del t
    apply_gpu_settings(True, False)
    return out


def r1_precision(ctx) -> dict:
    """R1 of one fixed batch: TF32 and bf16 autocast against fp32 (TF32 off), relative error; and the bf16
    run with loss.r1_precision=fp32, which should match fp32 exactly."""
    from ddaebm.losses import draw_step_batch, energy_loss
    from ddaebm.model import Model
    from ddaebm.networks.precision import autocast_bf16
    from ddaebm.training.perf import apply_gpu_settings

    cfg = config("tiny/cifar10.yaml" if ctx.quick else "cifar10.yaml", ctx, "loss.r1_target=energy_only")
    model = Model(cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.energy.parameters():  # off the initialisation, where f = −½‖x‖² in any precision
            p.add_(0.02 * torch.randn_like(p))
    x0 = Images(model.data_shape, 4 if ctx.quick else 32, model.device).next_batch()
    b = draw_step_batch(x0, model.schedule, model.gen_enc.generator, model.terms, cfg.model.nz,
                        torch.Generator(device=model.device).manual_seed(0))
    energy = model.energy.eval()

    def r1(loss_cfg=cfg.loss) -> torch.Tensor:
        return energy_loss(energy, model.schedule, b, loss_cfg)[1]["r1"].double()

    apply_gpu_settings(True, False)
    ref = r1()
    out = {"r1_fp32": float(ref)}
    if ctx.cuda:
        apply_gpu_settings(True, True)
        out["rel_err_tf32"] = float((r1() - ref).abs() / ref)
        apply_gpu_settings(True, False)
    autocast_bf16(energy)
    network = type(cfg.loss)(**{**cfg.loss.__dict__, "r1_precision": "network"})
    out["rel_err_bf16"] = float((r1(network) - ref).abs() / ref)
    out["rel_err_bf16_r1_fp32"] = float((r1() - ref).abs() / ref)
    return out


def host_syncs(ctx) -> dict:
    """Host synchronisations per training iteration (expected ≤ 1): CUDA sync and device-to-host copy calls in a
    torch.profiler trace of 3 iterations, and CUDA's sync-debug warnings as a second count."""
    t = trainer(config("tiny/cifar10.yaml" if ctx.quick else "cifar10.yaml", ctx, "data.batch=8"), ctx)
    for _ in range(2):
        t.train_step()
    if not ctx.cuda:
        raise Skip("counted on the CPU by tests/test_gpu_paths.py (Tensor reads); the trace needs CUDA")
    from torch.profiler import ProfilerActivity, profile

    sync(ctx)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            t.train_step()
        sync(ctx)
    events = [e.name for e in prof.events() if any(s in e.name for s in SYNC_EVENTS) and "Async" not in e.name]
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            t.train_step()
    torch.cuda.set_sync_debug_mode("default")
    return {"profiler_syncs_per_iter": (len(events) - 1) / 3, "sync_warnings_per_iter": len(caught) / 3,
            "events": sorted(set(events))}


def checkpoint_roundtrip(ctx) -> dict:
    """Save → a new trainer → load → 2 steps: bit-exact against continuing (dropout's RNG included)."""
    from ddaebm.checkpoint import save_checkpoint
    from ddaebm.training.loop import build_trainer, prepare_run

    cfg = config("tiny/cifar10.yaml", ctx, "data.batch=4", "model.dropout=0.1")
    run = ctx.tmp / "roundtrip"
    t = trainer(cfg, ctx)
    for _ in range(3):
        t.train_step()
    save_checkpoint(run, t.step, t.engines, t.state_dict, 2, True)
    for _ in range(2):
        t.train_step()
    state = prepare_run(cfg, run, "auto")
    resumed = build_trainer(cfg, state)
    resumed._stream = Images(resumed.model.data_shape, cfg.data.batch, resumed.device)
    resumed._stream.load_state_dict(state["stream"])
    for _ in range(2):
        resumed.train_step()
    same = all(torch.equal(a, b) for a, b in zip(t.model.energy.parameters(), resumed.model.energy.parameters()))
    same &= all(torch.equal(a, b) for a, b in zip(t.model.gen_enc.parameters(), resumed.model.gen_enc.parameters()))
    return {"bit_exact": bool(same), "step": resumed.step}


def universal_conversion(ctx) -> dict:
    """ZeRO 1 shards of both engines to a universal checkpoint (what a resume at another world size runs)."""
    from ddaebm.checkpoint import save_checkpoint
    from ddaebm.training.deepspeed_engine import convert_to_universal

    cfg = config("tiny/lsun_church128.yaml" if ctx.quick else "lsun_church128.yaml", ctx, "dist.backend=deepspeed",
                 "dist.zero_stage=1", "data.batch=2")
    t = trainer(cfg, ctx)
    t.train_step()
    folder = save_checkpoint(ctx.tmp / "universal", t.step, t.engines, t.state_dict, 2, True)
    t0 = time.perf_counter()
    for name in t.engines:
        convert_to_universal(folder / "engines" / name)
    files = sum(1 for p in folder.rglob("*") if p.is_file())
    return {"convert_seconds": round(time.perf_counter() - t0, 1), "files": files}


def dali_formats(ctx) -> dict:
    """DALI's `mixed` decoder feeding the training loop from JPEG, WebP and PNG shards: img/s of the stream alone
    and under training steps, data.workers 2 and 8 (JPEG decodes on the GPU, WebP and PNG on the CPU)."""
    if not ctx.cuda:
        raise Skip("DALI's mixed decoder needs a GPU")
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as err:
        raise Skip(f"no DALI: {err}") from None
    from bench.gpu_checks_data import format_shards, stream_rates

    out = {}
    for fmt in ("jpeg", "webp", "png"):
        shards = format_shards(ctx.tmp / fmt, fmt, 256, 128)
        for workers in (2, 8):
            out[f"{fmt}_workers{workers}"] = stream_rates(shards, workers, ctx, lambda: trainer(
                config("tiny/lsun_church128.yaml", ctx, "data.batch=32"), ctx))
    return out


def fused_adam(ctx) -> dict:
    """Our direct fused Adam step against torch.optim.Adam(fused=True) on the LSUN energy's parameters: the same
    bits after 10 steps, and the time per step."""
    from ddaebm.config import OptimConfig
    from ddaebm.model import Model
    from ddaebm.training.engine import adam
    from ddaebm.training.perf import fast_adam_steps

    energy = Model(config("tiny/lsun_church128.yaml" if ctx.quick else "lsun_church128.yaml", ctx)).energy
    ours = [p.detach().clone().requires_grad_(True) for p in energy.parameters()]
    ref = [p.detach().clone().requires_grad_(True) for p in energy.parameters()]
    opt_ours, opt_ref = adam(ours, 1e-4, OptimConfig()), torch.optim.Adam(ref, 1e-4, betas=(0.0, 0.9), fused=True)
    fast_adam_steps(opt_ours)
    times = {"ours": 0.0, "torch": 0.0}
    for i in range(10):
        g = [torch.randn_like(p) for p in ours]
        for params, opt, key in ((ours, opt_ours, "ours"), (ref, opt_ref, "torch")):
            for p, gi in zip(params, g):
                p.grad = gi.clone()
            sync(ctx)
            t0 = time.perf_counter()
            opt.step()
            sync(ctx)
            times[key] += time.perf_counter() - t0 if i else 0.0
    return {"bit_exact": all(torch.equal(a, b) for a, b in zip(ours, ref)),
            "ms_per_step": {k: round(v / 9 * 1000, 3) for k, v in times.items()}}


def toy(ctx) -> dict:
    """200 toy steps on the device (the fast path's first run there): losses finite and falling; and one step of
    the fast path against generic autograd from the same state."""
    from ddaebm.losses import GENERIC
    from ddaebm.training.trainer import Trainer

    cfg = config("toy/25gaussians.yaml", ctx)
    t = Trainer(cfg)
    rows = [{k: float(v) for k, v in t.train_step().items()} for _ in range(30 if ctx.quick else 200)]
    head, tail = rows[:10], rows[-10:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    fast, generic = Trainer(cfg), Trainer(cfg, objectives=GENERIC)
    fast.train_step(), generic.train_step()
    diff = float((flat_weights(fast.model.energy) - flat_weights(generic.model.energy)).abs().max())
    return {"objectives": t.objectives_note, "finite": all(all(v == v for v in r.values()) for r in rows),
            "L_rec": [round(mean(head, "L_rec"), 3), round(mean(tail, "L_rec"), 3)],
            "loss_gen": [round(mean(head, "loss_gen"), 3), round(mean(tail, "loss_gen"), 3)],
            "L_rec_falls": mean(tail, "L_rec") < mean(head, "L_rec"), "fast_vs_generic_max_abs_diff": diff}


CHECKS = {f.__name__: f for f in (stats_contract, deepspeed_stages, fp16, lsun_speed, r1_precision, host_syncs,
                                  checkpoint_roundtrip, universal_conversion, dali_formats, fused_adam, toy)}
