"""The training loop around a Trainer: intervals, checkpoints, snapshots, final evaluation.

To resume, run the same command again: the job continues from the newest checkpoint in the run directory that
verifies (after checking that it is the same experiment; ddaebm/training/resume.py decides, the command line
holds the run dir's lock), or starts fresh when there is none. The same loop runs on one process or on every
rank of a launcher; only rank 0 writes logs, plots and pointers, every rank takes part in checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ddaebm import distributed
from ddaebm.checkpoint import save_checkpoint
from ddaebm.config import Config, to_yaml
from ddaebm.data.stream import is_toy
from ddaebm.evaluation.toy import evaluate_toy
from ddaebm.fsio import write_atomic
from ddaebm.networks import parameter_counts
from ddaebm.snapshots import save_reals, save_snapshot
from ddaebm.training.monitor import Monitor
from ddaebm.training.perf import apply_gpu_settings, retain_freed_heap_memory
from ddaebm.training.preemption import NonFiniteStop, Preempted, stop_signals
from ddaebm.training.resume import check_resumable, prepare_run  # noqa: F401 (the loop's public API before the split)
from ddaebm.training.trainer import Trainer


def default_run_dir(cfg: Config) -> Path:
    return Path("runs") / cfg.name


def build_trainer(cfg: Config, state: dict | None, rank: int = 0, world: int = 1) -> Trainer:
    """A Trainer on the configured backend, restored from `state` (and its checkpoint folder) when given."""
    trainer = Trainer(cfg, rank, world, resume_state=state)
    if state is not None:
        trainer.load_state_dict(state)
        trainer.load_engines(state["checkpoint_dir"])
    return trainer


def train(cfg: Config, run_dir: Path, state: dict | None = None, rank: int = 0, world: int = 1,
          trainer: Trainer | None = None, slice_steps: int | None = None, announce: bool | None = None) -> Trainer:
    """Train until cfg.train.steps, checkpointing, logging and plotting at the configured intervals.

    `slice_steps` ends this invocation after that many iterations (with a checkpoint), so a scheduler can
    chain jobs; the run continues, bit-identically, when the same command runs again. SIGTERM or SIGUSR1
    finish the current iteration, checkpoint and raise Preempted; `train.max_nonfinite` consecutive NaN/Inf
    iterations raise NonFiniteStop without a checkpoint, so the last good one stays the newest.
    `announce` writes the start-up lines (step, parameter counts); by default only when this call builds or loads
    the trainer, so the slices of a live one (bench/fidelity.py, Ray trials) stay quiet.
    """
    if announce is None:
        announce = trainer is None or state is not None
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
    if announce:
        _announce(cfg, run_dir, trainer, monitor, resumed=bool(state) or trainer.step > 0, world=world)
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
                cause = signalled.name or "a stop signal on another rank"  # the ranks agree; one of them was signalled
                monitor.write(f"preempted ({cause}): stopped at step {step} with a checkpoint")
                monitor.close()
                raise Preempted(step)
    monitor.close()
    if lead and cfg.train.eval_at_end and trainer.step == cfg.train.steps and is_toy(cfg):
        evaluate_toy(trainer.model, run_dir)
    return trainer


def _announce(cfg: Config, run_dir: Path, trainer: Trainer, monitor: Monitor, resumed: bool, world: int) -> None:
    monitor.write(f"{'resumed at' if resumed else 'starting'} step {trainer.step}/{cfg.train.steps} in {run_dir}"
                  + (f" on {world} ranks" if world > 1 else ""))
    counts = parameter_counts(trainer.energy, trainer.gen_enc)
    monitor.write("parameters: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items())
                  + f"; device {trainer.device}, {cfg.dist.precision}; losses: {trainer.objectives_note}")
    if world > 1 and cfg.model.arch == "toy" and cfg.model.gen_norm == "batch":
        monitor.write(f"note: the generator's BatchNorm normalises each rank's {cfg.data.batch // world} rows by "
                      "their own statistics, so this run differs from one on another number of ranks (README, "
                      "\"Several ranks\")")


def _check_nonfinite(trainer: Trainer, monitor: Monitor) -> None:
    limit, streak = trainer.cfg.train.max_nonfinite, trainer.nonfinite_streak
    if streak:
        monitor.write(f"step {trainer.step}: non-finite loss, update skipped ({trainer.nonfinite_total} so far)")
    if limit and streak >= limit:
        monitor.close()
        raise NonFiniteStop(f"{streak} consecutive iterations with a non-finite loss (train.max_nonfinite="
                            f"{limit}); stopped at step {trainer.step}, the last good checkpoint is kept")
