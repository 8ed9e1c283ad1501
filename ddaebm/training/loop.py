"""The training loop around a Trainer: run directory, resume, intervals, snapshots, final evaluation.

To resume, run the same command again: `resume='auto'` continues from the newest complete checkpoint in the
run directory that verifies (after checking that it is the same experiment), or starts fresh when there is
none. The same loop runs on one process or on every rank of a launcher; only rank 0 writes logs, plots and
pointers, every rank takes part in checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ddaebm import distributed
from ddaebm.checkpoint import (complete_checkpoints, load_checkpoint, newest_valid_checkpoint, save_checkpoint,
                               verify_checkpoint)
from ddaebm.config import Config, ConfigError, experiment_differences, to_yaml
from ddaebm.data.stream import is_toy
from ddaebm.evaluation.toy import evaluate_toy
from ddaebm.fsio import write_atomic
from ddaebm.networks import parameter_counts
from ddaebm.snapshots import save_reals, save_snapshot
from ddaebm.training.monitor import Monitor
from ddaebm.training.perf import apply_gpu_settings, retain_freed_heap_memory
from ddaebm.training.preemption import NonFiniteStop, Preempted, stop_signals
from ddaebm.training.trainer import Trainer


def default_run_dir(cfg: Config) -> Path:
    return Path("runs") / cfg.name


def resolve_resume(run_dir: Path, resume: str, warn: bool = True) -> tuple[Path, dict] | None:
    """The checkpoint to continue from and its state: 'auto' (newest valid, or none), 'never', or a path."""
    if resume == "auto":
        return newest_valid_checkpoint(run_dir, warn)
    if resume == "never":
        if complete_checkpoints(run_dir):
            raise ConfigError(f"{run_dir} already holds checkpoints; use --resume auto or another --run-dir")
        return None
    path = Path(resume)
    if not path.exists():
        raise ConfigError(f"--resume {resume}: no such checkpoint")
    if path.is_dir():
        verify_checkpoint(path)
    return path, load_checkpoint(path)


def check_same_experiment(saved_config: dict, cfg: Config, where: Path) -> None:
    diffs = experiment_differences(saved_config, cfg)
    if diffs:
        raise ConfigError(f"{where} holds a different experiment ({'; '.join(diffs[:4])}); "
                          "use another --run-dir or the same config")


def prepare_run(cfg: Config, run_dir: Path, resume: str = "auto", warn: bool = True) -> dict | None:
    """Validate the run directory against `cfg` and return the checkpoint state to resume from, if any.

    The state carries its folder under "checkpoint_dir" (a DeepSpeed run loads its engine shards from there).
    Raises ConfigError before anything is written, so bad input leaves the disk untouched.
    """
    found = resolve_resume(run_dir, resume, warn)
    if found is None:
        return None
    ckpt, state = found
    check_same_experiment(state["config"], cfg, ckpt)
    state["checkpoint_dir"] = str(ckpt)
    return state


def build_trainer(cfg: Config, state: dict | None, rank: int = 0, world: int = 1) -> Trainer:
    """A Trainer on the configured backend, restored from `state` (and its checkpoint folder) when given."""
    trainer = Trainer(cfg, rank, world, resume_state=state)
    if state is not None:
        trainer.load_state_dict(state)
        trainer.load_engines(state["checkpoint_dir"])
    return trainer


def train(cfg: Config, run_dir: Path, state: dict | None = None, rank: int = 0, world: int = 1,
          trainer: Trainer | None = None, slice_steps: int | None = None) -> Trainer:
    """Train until cfg.train.steps, checkpointing, logging and plotting at the configured intervals.

    `slice_steps` ends this invocation after that many iterations (with a checkpoint), so a scheduler can
    chain jobs; the run continues, bit-identically, when the same command runs again. SIGTERM or SIGUSR1
    finish the current iteration, checkpoint and raise Preempted; `train.max_nonfinite` consecutive NaN/Inf
    iterations raise NonFiniteStop without a checkpoint, so the last good one stays the newest.
    """
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    if distributed.resolve_device(cfg.dist.device).type == "cpu":
        retain_freed_heap_memory()  # process-wide: every step reuses the previous one's memory (training/perf.py)
    else:
        apply_gpu_settings(cfg.dist.cudnn_benchmark, cfg.dist.tf32)
    lead = rank == 0
    if trainer is None:
        trainer = build_trainer(cfg, state, rank, world)
    elif state is not None:
        trainer.load_state_dict(state)
    run_dir.mkdir(parents=True, exist_ok=True)
    if lead:
        write_atomic(run_dir / "config.yaml", to_yaml(cfg))
    reduce = distributed.mean_over_ranks if world > 1 else None
    monitor = Monitor(run_dir, cfg.train.steps, trainer.step, cfg.data.batch, cfg.train.log_every, lead, reduce)
    monitor.write(f"{'resumed at' if state else 'starting'} step {trainer.step}/{cfg.train.steps} in {run_dir}"
                  + (f" on {world} ranks" if world > 1 else ""))
    counts = parameter_counts(trainer.energy, trainer.gen_enc)
    monitor.write("parameters: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items())
                  + f"; device {trainer.device}, {cfg.dist.precision}; losses: {trainer.objectives_note}")
    if lead and trainer.step == 0:
        save_reals(trainer.model, run_dir)
    stop = cfg.train.steps if slice_steps is None else min(cfg.train.steps, trainer.step + slice_steps)
    with stop_signals() as signalled:
        while trainer.step < stop:
            monitor.record(trainer.train_step(signalled.is_set))
            step = trainer.step
            monitor.step_done(step)
            _check_nonfinite(trainer, monitor)
            preempted = trainer.stop_agreed  # agreed by all ranks within the step's last gradient exchange
            healthy = trainer.nonfinite_streak == 0  # never checkpoint in the middle of a NaN streak
            if healthy and (step % cfg.train.ckpt_every == 0 or step == stop or preempted):
                save_checkpoint(run_dir, step, trainer.engines, trainer.state_dict, cfg.train.keep_ckpts, lead)
            if lead and (step % cfg.train.snapshot_every == 0 or step == cfg.train.steps):
                save_snapshot(trainer.model, run_dir, step)
            if preempted:
                monitor.write(f"preempted ({signalled.name}): stopped at step {step} with a checkpoint")
                monitor.close()
                raise Preempted(step)
    monitor.close()
    if lead and cfg.train.eval_at_end and trainer.step == cfg.train.steps and is_toy(cfg):
        evaluate_toy(trainer.model, run_dir)
    return trainer


def _check_nonfinite(trainer: Trainer, monitor: Monitor) -> None:
    limit, streak = trainer.cfg.train.max_nonfinite, trainer.nonfinite_streak
    if streak:
        monitor.write(f"step {trainer.step}: non-finite loss, update skipped ({trainer.nonfinite_total} so far)")
    if limit and streak >= limit:
        monitor.close()
        raise NonFiniteStop(f"{streak} consecutive iterations with a non-finite loss (train.max_nonfinite="
                            f"{limit}); stopped at step {trainer.step}, the last good checkpoint is kept")
