"""What a training run leaves to look at: reals.png, and sample and density frames under snapshots/ (fixed seeds,
so frames of one run compare), drawn from a model handle."""

from __future__ import annotations

from pathlib import Path

import torch

from ddaebm.data.stream import is_toy
from ddaebm.model import Model


def save_reals(model: Model, run_dir: Path) -> None:
    """reals.png: 5000 toy points, or a grid of the first 64 images of the shard set (no augmentation)."""
    if not is_toy(model.cfg):
        from ddaebm.data.pixels import save_grid, to_uint8

        save_grid(run_dir / "reals.png", to_uint8(first_images(model.cfg, 64), model.cfg.data.preprocess))
        return
    from ddaebm.data.toy import sample_toy
    from ddaebm.plots import save_scatter

    e = model.cfg.eval
    data = sample_toy(model.cfg.data.dataset, 5000, torch.Generator().manual_seed(12345)).numpy()
    save_scatter(run_dir / "reals.png", data, e.range_lo, e.range_hi, f"{model.cfg.data.dataset}: data")


def first_images(cfg, num: int) -> torch.Tensor:
    """The first `num` images of the training split, preprocessed as for training but not flipped."""
    from ddaebm.data.images import iterate_split
    from ddaebm.data.stream import image_stream_args

    batches, total = [], 0
    for images, _ in iterate_split(**image_stream_args(cfg), batch=num):
        batches.append(images)
        total += len(images)
        if total >= num:
            break
    return torch.cat(batches)[:num]


def save_snapshot(model: Model, run_dir: Path, step: int) -> None:
    """snapshots/: toy sample scatter and density; image sample grids (fixed seeds, so frames compare)."""
    from ddaebm.data.stream import is_toy

    out = run_dir / "snapshots"
    out.mkdir(exist_ok=True)
    if not is_toy(model.cfg):
        save_image_snapshot(model, out, step)
        return
    from ddaebm.plots import save_density, save_scatter

    e = model.cfg.eval
    x = model.generate(2000, seed=0).cpu().numpy()
    save_scatter(out / f"fakes-{step:09d}.png", x, e.range_lo, e.range_hi, f"samples, step {step}")
    _, f = model.density(e.grid, e.range_lo, e.range_hi)
    save_density(out / f"density-{step:09d}.png", f, e.range_lo, e.range_hi, f"exp f(x, 0), step {step}")


def save_image_snapshot(model: Model, out: Path, step: int, num: int = 64) -> None:
    """fakes-STEP.png (4-step samples 0..63); for NICE also exact-STEP.png, exact samples of f(·,0) (method.md §7.5)."""
    from ddaebm.data.pixels import save_grid, to_uint8

    prep = model.cfg.data.preprocess
    save_grid(out / f"fakes-{step:09d}.png", to_uint8(model.generate(num, seed=0, batch=num), prep))
    _, energy = model.sampling_networks(model.cfg.eval.energy_ema)
    if hasattr(energy, "sample"):
        with torch.no_grad():
            exact = energy.sample(num, 0, torch.Generator().manual_seed(0))
        save_grid(out / f"exact-{step:09d}.png", to_uint8(exact, prep))


