"""`ddaebm eval toy` and the end-of-run evaluation of a toy model: sample quality and density metrics
(ddaebm/metrics/toy.py), the samples and density saved as .npy/.png, one row appended to metric-toy.jsonl."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ddaebm.evaluation.rows import append_row
from ddaebm.model import Model


def evaluate_toy(model: Model, run_dir: Path, num: int | None = None, grid: int | None = None,
                 lo: float | None = None, hi: float | None = None, seed: int = 0) -> dict:
    """Toy metrics of the current model, appended to metric-toy.jsonl, with samples and density saved."""
    from ddaebm.data.toy import sample_toy
    from ddaebm.metrics.toy import toy_metrics
    from ddaebm.plots import save_density, save_scatter

    e = model.cfg.eval
    num, grid = num or e.num_samples, grid or e.grid
    lo = e.range_lo if lo is None else lo
    hi = e.range_hi if hi is None else hi
    x = model.generate(num, seed=seed).cpu().numpy()
    data = sample_toy(model.cfg.data.dataset, num, torch.Generator().manual_seed(10_000 + seed)).numpy()
    side, f = model.density(grid, lo, hi)
    t0 = time.perf_counter()
    metrics = toy_metrics(x, data, model.cfg.data.dataset, log_density=f, side=side, seed=seed)
    metrics.update(per_step_quality(model, min(num, 5000), seed))
    row = {"step": model.step, "dataset": model.cfg.data.dataset, "num_samples": num, "grid": grid,
           "range": [lo, hi], **metrics, "eval_seconds": round(time.perf_counter() - t0, 2)}
    np.save(run_dir / "samples.npy", x)
    save_scatter(run_dir / "samples.png", x, lo, hi, f"samples, step {model.step}")
    save_density(run_dir / "density.png", f, lo, hi, f"exp f(x, 0), step {model.step}")
    append_row(run_dir, "toy", row)
    return row


def per_step_quality(model: Model, num: int, seed: int = 0) -> dict:
    """Which denoising step loses quality: start from *real* x_{k+1} and run the model's steps k … 0.

    For k = 0 this measures the last step alone, for k = T−1 the whole chain; a drop between k and k+1
    points at step k+1. Reported as sliced W1 to data, and as the 3σ fraction for the Gaussian mixtures.
    """
    from ddaebm.data.toy import sample_toy, toy_modes
    from ddaebm.diffusion.schedule import diffuse_pair
    from ddaebm.metrics.toy import mode_stats, sliced_w1
    from ddaebm.sampling import bn_mode, denoise

    cfg = model.cfg
    generator = model.sampling_generator(cfg.sample.use_ema)  # the one `generate` samples with
    rng = torch.Generator().manual_seed(seed)
    data = sample_toy(cfg.data.dataset, num, rng)
    modes = toy_modes(cfg.data.dataset)
    out = {}
    with bn_mode(generator, cfg.model.sample_bn_mode == "train"):
        for step in range(model.schedule.num_steps):
            k = torch.full((num,), step, dtype=torch.long)
            _, x_k1 = diffuse_pair(model.schedule.to("cpu"), data, k, torch.randn(data.shape, generator=rng),
                                   torch.randn(data.shape, generator=rng))
            x = denoise(generator, model.schedule, x_k1.to(model.device), step, cfg.model.nz, rng,
                        model.terms.latent)
            x = x.cpu().numpy()
            out[f"from_real_x{step + 1}_sliced_w1"] = sliced_w1(x, data.numpy(), seed=seed)
            if modes is not None:
                out[f"from_real_x{step + 1}_within_3sigma"] = mode_stats(x, modes[0].numpy(), modes[1])[
                    "frac_within_3sigma"]
    return out


