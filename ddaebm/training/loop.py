"""The training loop around a Trainer: run directory, resume, intervals, snapshots, final evaluation.

To resume, run the same command again: `resume='auto'` continues from the newest complete checkpoint in the
run directory (after checking that it is the same experiment), or starts fresh when there is none.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ddaebm.config import Config, ConfigError, experiment_differences, to_yaml
from ddaebm.training.checkpoint import (complete_checkpoints, latest_checkpoint, load_checkpoint, save_checkpoint,
                                        write_atomic)
from ddaebm.training.monitor import Monitor
from ddaebm.training.trainer import Trainer


def default_run_dir(cfg: Config) -> Path:
    return Path("runs") / cfg.name


def resolve_resume(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint to continue from: 'auto' (newest complete, or none), 'never', or a checkpoint path."""
    if resume == "auto":
        return latest_checkpoint(run_dir)
    if resume == "never":
        if complete_checkpoints(run_dir):
            raise ConfigError(f"{run_dir} already holds checkpoints; use --resume auto or another --run-dir")
        return None
    path = Path(resume)
    if not path.exists():
        raise ConfigError(f"--resume {resume}: no such checkpoint")
    return path


def check_same_experiment(saved_config: dict, cfg: Config, where: Path) -> None:
    diffs = experiment_differences(saved_config, cfg)
    if diffs:
        raise ConfigError(f"{where} holds a different experiment ({'; '.join(diffs[:4])}); "
                          "use another --run-dir or the same config")


def prepare_run(cfg: Config, run_dir: Path, resume: str = "auto") -> dict | None:
    """Validate the run directory against `cfg` and return the checkpoint state to resume from, if any.

    Raises ConfigError before anything is written, so bad input leaves the disk untouched.
    """
    ckpt = resolve_resume(run_dir, resume)
    if ckpt is None:
        return None
    state = load_checkpoint(ckpt)
    check_same_experiment(state["config"], cfg, ckpt)
    return state


def train(cfg: Config, run_dir: Path, state: dict | None = None, rank: int = 0, world: int = 1,
          trainer: Trainer | None = None, slice_steps: int | None = None) -> Trainer:
    """Train until cfg.train.steps, checkpointing, logging and plotting at the configured intervals.

    `slice_steps` ends this invocation after that many iterations (with a checkpoint), so a scheduler can
    chain jobs; the run continues, bit-identically, when the same command runs again.
    """
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    lead = rank == 0
    trainer = trainer or Trainer(cfg, rank, world)
    if state is not None:
        trainer.load_state_dict(state)
    run_dir.mkdir(parents=True, exist_ok=True)
    if lead:
        write_atomic(run_dir / "config.yaml", to_yaml(cfg))
    monitor = Monitor(run_dir, cfg.train.steps, trainer.step, cfg.data.batch, cfg.train.log_every, lead)
    monitor.write(f"{'resumed at' if state else 'starting'} step {trainer.step}/{cfg.train.steps} in {run_dir}")
    if lead and trainer.step == 0:
        save_reals(trainer, run_dir)
    stop = cfg.train.steps if slice_steps is None else min(cfg.train.steps, trainer.step + slice_steps)
    while trainer.step < stop:
        monitor.record(trainer.train_step())
        step = trainer.step
        monitor.step_done(step)
        if step % cfg.train.ckpt_every == 0 or step == stop:
            save_checkpoint(run_dir, step, trainer.state_dict(), cfg.train.keep_ckpts)
        if lead and (step % cfg.train.snapshot_every == 0 or step == cfg.train.steps):
            save_snapshot(trainer, run_dir, step)
    monitor.close()
    if lead and cfg.train.eval_at_end and trainer.step == cfg.train.steps:
        evaluate_toy(trainer, run_dir)
    return trainer


def save_reals(trainer: Trainer, run_dir: Path) -> None:
    from ddaebm.data.toy import sample_toy
    from ddaebm.plots import save_scatter

    e = trainer.cfg.eval
    data = sample_toy(trainer.cfg.data.dataset, 5000, torch.Generator().manual_seed(12345)).numpy()
    save_scatter(run_dir / "reals.png", data, e.range_lo, e.range_hi, f"{trainer.cfg.data.dataset}: data")


def generate(trainer: Trainer, num: int, seed: int, refine: bool = False, use_ema: bool = True) -> torch.Tensor:
    """num samples from the trained model (EMA generator when kept), optionally energy-refined."""
    from ddaebm.sampling import refine as refine_fn
    from ddaebm.sampling import sample

    gen_enc, energy = trainer.sampling_networks(use_ema)
    m = trainer.cfg.model
    x = sample(gen_enc.generator, trainer.schedule, num, trainer.stream.data_shape, m.nz,
               torch.Generator().manual_seed(seed), use_latent=trainer.terms.latent,
               bn_train=m.sample_bn_mode == "train")
    return refine_fn(energy, x, trainer.cfg.sample.refine_step) if refine else x


def density(trainer: Trainer, grid: int, lo: float, hi: float, use_ema: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(side, f(x, k=0) on the grid) with the raw energy by default (SPEC §7.3)."""
    from ddaebm.sampling import energy_grid, grid_side

    side = grid_side(lo, hi, grid)
    _, energy = trainer.sampling_networks(use_ema)
    return side, energy_grid(energy, side)


def save_snapshot(trainer: Trainer, run_dir: Path, step: int) -> None:
    from ddaebm.plots import save_density, save_scatter

    e = trainer.cfg.eval
    out = run_dir / "snapshots"
    out.mkdir(exist_ok=True)
    x = generate(trainer, 2000, seed=0).numpy()
    save_scatter(out / f"fakes-{step:09d}.png", x, e.range_lo, e.range_hi, f"samples, step {step}")
    _, f = density(trainer, e.grid, e.range_lo, e.range_hi)
    save_density(out / f"density-{step:09d}.png", f, e.range_lo, e.range_hi, f"exp f(x, 0), step {step}")


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
    x = generate(trainer, num, seed=seed).numpy()
    data = sample_toy(trainer.cfg.data.dataset, num, torch.Generator().manual_seed(10_000 + seed)).numpy()
    side, f = density(trainer, grid, lo, hi)
    t0 = time.perf_counter()
    metrics = toy_metrics(x, data, trainer.cfg.data.dataset, log_density=f, side=side, seed=seed)
    row = {"step": trainer.step, "dataset": trainer.cfg.data.dataset, "num_samples": num, "grid": grid,
           "range": [lo, hi], **metrics, "eval_seconds": round(time.perf_counter() - t0, 2)}
    np.save(run_dir / "samples.npy", x)
    save_scatter(run_dir / "samples.png", x, lo, hi, f"samples, step {trainer.step}")
    save_density(run_dir / "density.png", f, lo, hi, f"exp f(x, 0), step {trainer.step}")
    with open(run_dir / "metric-toy.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")
    return row


def trainer_from_run(run_dir: Path) -> Trainer:
    """A Trainer restored from the newest complete checkpoint of `run_dir` (for sample/density/eval)."""
    from ddaebm.config import config_from_dict

    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise ConfigError(f"{run_dir}: no checkpoint found")
    state = load_checkpoint(ckpt)
    trainer = Trainer(config_from_dict(state["config"]))
    trainer.load_state_dict(state)
    return trainer
