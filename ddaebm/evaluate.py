"""Using a trained model: restore it from a run dir, sample, score the energy on a grid, evaluate and plot."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ddaebm.config import ConfigError
from ddaebm.training.checkpoint import newest_valid_checkpoint
from ddaebm.training.trainer import Trainer


def save_reals(trainer: Trainer, run_dir: Path) -> None:
    """reals.png: 5000 toy points, or a grid of the first 64 images of the shard set (no augmentation)."""
    from ddaebm.data.stream import is_toy

    if not is_toy(trainer.cfg):
        from ddaebm.data.pixels import save_grid, to_uint8

        save_grid(run_dir / "reals.png", to_uint8(first_images(trainer.cfg, 64), trainer.cfg.data.preprocess))
        return
    from ddaebm.data.toy import sample_toy
    from ddaebm.plots import save_scatter

    e = trainer.cfg.eval
    data = sample_toy(trainer.cfg.data.dataset, 5000, torch.Generator().manual_seed(12345)).numpy()
    save_scatter(run_dir / "reals.png", data, e.range_lo, e.range_hi, f"{trainer.cfg.data.dataset}: data")


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


def generate(trainer: Trainer, num: int, seed: int, refine: bool = False, use_ema: bool | None = None,
             indices=None, batch: int = 10_000) -> torch.Tensor:
    """num samples from the trained model (on its device), optionally energy-refined.

    use_ema: the EMA generator (and energy, for refinement) when kept; None follows sample.use_ema. Image and
    NICE models draw sample i from its own seed (sampling.sample_indexed): `indices` picks which samples.
    """
    from ddaebm.data.stream import is_toy
    from ddaebm.sampling import refine as refine_fn
    from ddaebm.sampling import sample, sample_indexed

    use_ema = trainer.cfg.sample.use_ema if use_ema is None else use_ema
    generator, (_, energy) = trainer.sampling_generator(use_ema), trainer.sampling_networks(use_ema)
    m = trainer.cfg.model
    if is_toy(trainer.cfg):
        x = sample(generator, trainer.schedule, num, trainer.data_shape, m.nz,
                   torch.Generator().manual_seed(seed), use_latent=trainer.terms.latent,
                   bn_train=m.sample_bn_mode == "train")
    else:
        indices = range(num) if indices is None else indices
        chunks = [sample_indexed(generator, trainer.schedule, indices[i:i + batch], seed, trainer.data_shape,
                                 m.nz, trainer.device, trainer.terms.latent) for i in range(0, len(indices), batch)]
        x = torch.cat(chunks)
    return refine_fn(energy, x, trainer.cfg.sample.refine_step) if refine else x


def density(trainer: Trainer, grid: int, lo: float, hi: float,
            use_ema: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(side, f(x, k=0) on the grid) (SPEC §7.3); use_ema None follows eval.energy_ema."""
    from ddaebm.sampling import energy_grid, grid_side

    side = grid_side(lo, hi, grid)
    _, energy = trainer.sampling_networks(trainer.cfg.eval.energy_ema if use_ema is None else use_ema)
    return side, energy_grid(energy, side)


def save_snapshot(trainer: Trainer, run_dir: Path, step: int) -> None:
    """snapshots/: toy sample scatter and density; image sample grids (fixed seeds, so frames compare)."""
    from ddaebm.data.stream import is_toy

    out = run_dir / "snapshots"
    out.mkdir(exist_ok=True)
    if not is_toy(trainer.cfg):
        save_image_snapshot(trainer, out, step)
        return
    from ddaebm.plots import save_density, save_scatter

    e = trainer.cfg.eval
    x = generate(trainer, 2000, seed=0).cpu().numpy()
    save_scatter(out / f"fakes-{step:09d}.png", x, e.range_lo, e.range_hi, f"samples, step {step}")
    _, f = density(trainer, e.grid, e.range_lo, e.range_hi)
    save_density(out / f"density-{step:09d}.png", f, e.range_lo, e.range_hi, f"exp f(x, 0), step {step}")


def save_image_snapshot(trainer: Trainer, out: Path, step: int, num: int = 64) -> None:
    """fakes-STEP.png (4-step samples 0..63); for NICE also exact-STEP.png, exact samples of f(·, 0) (SPEC §7.5)."""
    from ddaebm.data.pixels import save_grid, to_uint8

    prep = trainer.cfg.data.preprocess
    save_grid(out / f"fakes-{step:09d}.png", to_uint8(generate(trainer, num, seed=0, batch=num), prep))
    _, energy = trainer.sampling_networks(trainer.cfg.eval.energy_ema)
    if hasattr(energy, "sample"):
        with torch.no_grad():
            exact = energy.sample(num, 0, torch.Generator().manual_seed(0))
        save_grid(out / f"exact-{step:09d}.png", to_uint8(exact, prep))


def evaluate_toy(trainer: Trainer, run_dir: Path, num: int | None = None, grid: int | None = None,
                 lo: float | None = None, hi: float | None = None, seed: int = 0) -> dict:
    """Toy metrics of the current model, appended to metric-toy.jsonl, with samples and density saved."""
    from ddaebm.data.toy import sample_toy
    from ddaebm.metrics.toy import toy_metrics
    from ddaebm.plots import save_density, save_scatter

    e = trainer.cfg.eval
    num, grid = num or e.num_samples, grid or e.grid
    lo = e.range_lo if lo is None else lo
    hi = e.range_hi if hi is None else hi
    x = generate(trainer, num, seed=seed).cpu().numpy()
    data = sample_toy(trainer.cfg.data.dataset, num, torch.Generator().manual_seed(10_000 + seed)).numpy()
    side, f = density(trainer, grid, lo, hi)
    t0 = time.perf_counter()
    metrics = toy_metrics(x, data, trainer.cfg.data.dataset, log_density=f, side=side, seed=seed)
    metrics.update(per_step_quality(trainer, min(num, 5000), seed))
    row = {"step": trainer.step, "dataset": trainer.cfg.data.dataset, "num_samples": num, "grid": grid,
           "range": [lo, hi], **metrics, "eval_seconds": round(time.perf_counter() - t0, 2)}
    np.save(run_dir / "samples.npy", x)
    save_scatter(run_dir / "samples.png", x, lo, hi, f"samples, step {trainer.step}")
    save_density(run_dir / "density.png", f, lo, hi, f"exp f(x, 0), step {trainer.step}")
    with open(run_dir / "metric-toy.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")
    return row


def per_step_quality(trainer: Trainer, num: int, seed: int = 0) -> dict:
    """Which denoising step loses quality: start from *real* x_{k+1} and run the model's steps k … 0.

    For k = 0 this measures the last step alone, for k = T−1 the whole chain; a drop between k and k+1
    points at step k+1. Reported as sliced W1 to data, and as the 3σ fraction for the Gaussian mixtures.
    """
    from ddaebm.data.toy import sample_toy, toy_modes
    from ddaebm.diffusion.schedule import diffuse_pair
    from ddaebm.metrics.toy import mode_stats, sliced_w1
    from ddaebm.sampling import bn_mode, denoise

    cfg = trainer.cfg
    generator = trainer.sampling_generator(cfg.sample.use_ema)  # the one `generate` samples with
    rng = torch.Generator().manual_seed(seed)
    data = sample_toy(cfg.data.dataset, num, rng)
    modes = toy_modes(cfg.data.dataset)
    out = {}
    with bn_mode(generator, cfg.model.sample_bn_mode == "train"):
        for step in range(trainer.schedule.num_steps):
            k = torch.full((num,), step, dtype=torch.long)
            _, x_k1 = diffuse_pair(trainer.schedule.to("cpu"), data, k, torch.randn(data.shape, generator=rng),
                                   torch.randn(data.shape, generator=rng))
            x = denoise(generator, trainer.schedule, x_k1.to(trainer.device), step, cfg.model.nz, rng,
                        trainer.terms.latent)
            x = x.cpu().numpy()
            out[f"from_real_x{step + 1}_sliced_w1"] = sliced_w1(x, data.numpy(), seed=seed)
            if modes is not None:
                out[f"from_real_x{step + 1}_within_3sigma"] = mode_stats(x, modes[0].numpy(), modes[1])[
                    "frac_within_3sigma"]
    return out


def trainer_from_run(run_dir: Path) -> Trainer:
    """A Trainer restored from the newest checkpoint of `run_dir` that verifies (for sample/density/eval), by
    the same rule as resuming: a damaged newest one is skipped with a warning."""
    from ddaebm.config import config_from_dict

    found = newest_valid_checkpoint(run_dir)
    if found is None:
        raise ConfigError(f"{run_dir}: no checkpoint found")
    _, state = found
    trainer = Trainer(config_from_dict(state["config"]))
    trainer.load_state_dict(state)
    return trainer
