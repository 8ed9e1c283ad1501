"""The training loop around a Trainer: run directory, resume, intervals, snapshots, final evaluation.

To resume, run the same command again: `resume='auto'` continues from the newest complete checkpoint in the
run directory (after checking that it is the same experiment), or starts fresh when there is none.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ddaebm.config import Config, ConfigError, experiment_differences, to_yaml
from ddaebm.evaluate import evaluate_toy, save_reals, save_snapshot
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
