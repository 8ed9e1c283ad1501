"""One trial of cluster/sweep.py: its config, training in slices with a checkpoint and a report after each, the
sweep metric of the model, and the restore from the checkpoint Tune hands back after a failure.

`SweepSetup` is what the driver decides once and every trial reads. `TrialRun` is one rank's part of a trial
(restore, then a slice per call). `run_trial` is the Tune trainable of a trial that trains in its own process;
sweep_ranks.py runs a trial on several ranks. This module travels to Ray's workers by value
(ray_common.start_ray).
"""

from __future__ import annotations

import contextlib
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import ray_common as common
from sweep_space import param_overrides

TOY_METRICS = ("mmd2", "sliced_w1")
METRICS = (*TOY_METRICS, "fid", "l_rec")
EVAL_DATA_SEED = 10_000  # the fresh data the toy metric compares with: the draw `ddaebm eval toy` uses (seed 0)


@dataclass(frozen=True)
class SweepSetup:
    """Everything a trial needs to know of its sweep, decided by the driver before Ray starts."""

    config: Path  # CONFIG, resolved
    overrides: tuple[str, ...]  # the fixed key=value overrides of the command line
    space_keys: tuple[str, ...]  # the swept keys, sorted
    steps: int  # training budget of a trial
    report_every: int  # steps per slice: checkpoint + report
    metric: str  # one of METRICS, minimised
    eval_num: int  # samples per metric evaluation
    final_eval: bool  # `ddaebm eval toy` at the end of a toy trial that ran the whole budget
    shape: common.WorkerShape  # Ray Train workers per trial (1: the trial trains in its own process)
    storage: Path  # Tune's storage path, shared by all nodes
    name: str  # the experiment's name: <storage>/<name>
    crash_once_at: int | None = None  # test switch: SIGKILL the first trial process to pass this step

    @property
    def experiment(self) -> Path:
        return self.storage / self.name

    def run_dir(self, trial_id: str) -> Path:
        """The trial's ddaebm run directory (stats.jsonl, checkpoints, plots)."""
        return self.experiment / "runs" / trial_id

    def trial_config(self, params: dict, name: str):
        """CONFIG + the fixed overrides + `params`, at the sweep's budget (DeepSpeed on several workers)."""
        from ddaebm.config import load_config

        extra = [f"train.steps={self.steps}", "train.eval_at_end=false", *self.backend_overrides()]
        return load_config(self.config, [*self.overrides, *param_overrides(params), *extra], name=name)

    def backend_overrides(self) -> list[str]:
        """A trial on several workers trains with DeepSpeed, as its best config must then."""
        return ["dist.backend=deepspeed"] if self.shape.workers > 1 else []


# ---------------------------------------------------------------------------------------------- the metric

def measure(model, run_dir: Path, start: int, setup: SweepSetup) -> dict:
    """The sweep metric (and its companions) of the model as it stands after the slice from step `start`."""
    if setup.metric in TOY_METRICS:
        return toy_scores(model, setup.eval_num)
    if setup.metric == "fid":
        return {"fid": image_fid(model, setup.eval_num)}
    return {"l_rec": mean_l_rec(run_dir, start)}


def toy_scores(model, num: int) -> dict:
    """mmd2, sliced_w1 and the mode statistics of `num` samples against as many fresh data points
    (ddaebm.metrics.toy.toy_metrics, as `ddaebm eval toy` scores them, without its density grid)."""
    import torch

    from ddaebm.data.toy import sample_toy
    from ddaebm.metrics.toy import toy_metrics

    dataset = model.cfg.data.dataset
    x = model.generate(num, seed=0).cpu().numpy()
    data = sample_toy(dataset, num, torch.Generator().manual_seed(EVAL_DATA_SEED)).numpy()
    return toy_metrics(x, data, dataset)


def image_fid(model, num: int) -> float:
    """FID of `num` samples against the training split (reference statistics cached by ddaebm/metrics/fid.py).

    The hook for image sweeps: replace this function to score with another metric (it gets the live model
    handle, `trainer.model`).
    """
    from ddaebm.data.stream import resolution
    from ddaebm.metrics.fid import fid_of_model, reference_stats
    from ddaebm.metrics.inception import FeatureExtractor

    cfg = model.cfg
    extractor = FeatureExtractor(device=model.device)
    ref, _, _ = reference_stats(cfg.data.root, cfg.data.dataset, cfg.data.split, resolution(cfg), cfg.model.channels,
                                extractor, loader=cfg.data.loader)
    return fid_of_model(model, ref, num, batch=64, extractor=extractor)


def mean_l_rec(run_dir: Path, start: int) -> float:
    """The slice's mean reconstruction loss from stats.jsonl: cheap, but a training loss, not sample quality."""
    rows = common.stats_rows(run_dir, start)
    return sum(r["L_rec"] for r in rows) / len(rows) if rows else math.inf


def final_toy_scores(model, run_dir: Path) -> dict:
    """`ddaebm eval toy` at the end of the trial (plots, metric-toy.jsonl in the run dir), its numbers as
    final_* report entries."""
    from ddaebm.evaluation.toy import evaluate_toy

    final = evaluate_toy(model, run_dir)
    return {f"final_{k}": v for k, v in final.items() if isinstance(v, (int, float))}


# ---------------------------------------------------------------------------------------------- the run dir

def restore_state(cfg, run_dir: Path, checkpoint_dir: str | None, lead: bool = True) -> dict | None:
    """The state to continue from: the checkpoint Ray handed back (the run dir rewound to it), or a fresh run.
    Rank 0 tidies the run dir; the others wait for it."""
    from ddaebm import distributed
    from ddaebm.checkpoint import load_checkpoint
    from ddaebm.training.loop import prepare_run

    if lead and checkpoint_dir is None:
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh trial: nothing of an attempt that never reported
    elif lead:
        rewind(run_dir, load_checkpoint(checkpoint_dir)["step"])
    distributed.barrier()
    return None if checkpoint_dir is None else prepare_run(cfg, run_dir, resume=checkpoint_dir, warn=lead)


def rewind(run_dir: Path, step: int) -> None:
    """Forget the checkpoints a run dir holds past `step`: a trial restored from step's checkpoint (the one Tune
    kept, which may be older than the run dir's newest) redoes those steps and must not resume from what the
    killed attempt left behind. Its stats.jsonl rows past `step` are dropped by ddaebm's Monitor when the
    restored run starts (as on every resume), so no step is logged twice."""
    from ddaebm.checkpoint import POINTER, checkpoint_root, complete_checkpoints

    for ckpt in complete_checkpoints(run_dir):
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt, ignore_errors=True)
    (checkpoint_root(run_dir) / POINTER).unlink(missing_ok=True)  # falls back to the newest complete one


def current_checkpoint(run_dir: Path, step: int) -> Path | None:
    """The run dir's checkpoint of `step`, if that is the newest (a non-finite streak skips the slice's one)."""
    from ddaebm.checkpoint import latest_checkpoint

    latest = latest_checkpoint(run_dir)
    return latest if latest is not None and latest.name == f"step-{step:09d}" else None


# ---------------------------------------------------------------------------------------------- the trial

class TrialRun:
    """One rank's part of a trial: the run dir restored to the checkpoint Tune handed back (or started afresh),
    then trained a slice of `setup.report_every` steps per `next_slice()`, each ending with a checkpoint, the
    metric and a report row. Every rank of a multi-worker trial holds one and calls `next_slice()` in step."""

    def __init__(self, setup: SweepSetup, params: dict, trial_id: str, rank: int = 0, world: int = 1,
                 checkpoint=None):
        from ddaebm.launch import check_launch
        from ddaebm.training.loop import build_trainer

        self.setup, self.trial_id, self.rank, self.world = setup, trial_id, rank, world
        self.cfg = setup.trial_config(params, trial_id)
        # The driver checked one point of the space; this trial's values may not fit (a swept data.batch that does
        # not divide over the ranks would silently train on the rounded-down per-rank batch): fail it, saying why.
        check_launch(self.cfg, world)
        self.run_dir = setup.run_dir(trial_id)
        # The checkpoint folder is only needed until the engines are loaded (a remote one is a local copy).
        with checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None) as ckpt_dir:
            self.state = restore_state(self.cfg, self.run_dir, ckpt_dir, lead=rank == 0)
            self.trainer = build_trainer(self.cfg, self.state, rank, world) if self.state else None
        self.resumed_from = self.state["step"] if self.state else 0
        self.done = False

    def next_slice(self) -> tuple[dict, Path | None]:
        """Train the next slice; (the report row, the checkpoint to hand to Tune). Rank 0's row is the trial's."""
        from ddaebm.training.loop import train
        from ddaebm.training.preemption import NonFiniteStop

        start = self.trainer.step if self.trainer else 0
        try:
            self.trainer = train(self.cfg, self.run_dir, self.state, self.rank, self.world, trainer=self.trainer,
                                 slice_steps=self.setup.report_every)
        except NonFiniteStop as err:
            common.log(f"trial {self.trial_id}: {err}")
            self.done = True
            return {self.setup.metric: math.inf, "step": self.setup.steps, "resumed_from": self.resumed_from,
                    "finished": 1, "nonfinite": 1}, None
        self.state = None  # loaded by the first slice; the trainer carries on from here
        model, setup = self.trainer.model, self.setup
        self.done = model.step >= self.cfg.train.steps
        row = measure(model, self.run_dir, start, setup)
        if self.done and self.rank == 0 and setup.final_eval and setup.metric in TOY_METRICS:
            row.update(final_toy_scores(model, self.run_dir))
        crash_once(setup, model.step)
        row.update(step=model.step, resumed_from=self.resumed_from, finished=int(self.done))
        return row, current_checkpoint(self.run_dir, model.step)


def crash_once(setup: SweepSetup, step: int) -> None:
    """Test switch (--crash-once-at): the first trial process to pass that step dies by SIGKILL, once per sweep."""
    at = setup.crash_once_at
    if at and step >= at:
        common.die_once(setup.experiment / "crashed-once", f"--crash-once-at {at}: killing this trial process at "
                                                           f"step {step}")


def run_trial(params: dict, setup: SweepSetup) -> None:
    """A Tune function trainable: the trial trains in this process (dist.backend from CONFIG, one rank)."""
    from ray import tune

    run = TrialRun(setup, params, tune.get_context().get_trial_id(), checkpoint=tune.get_checkpoint())
    while not run.done:
        row, ckpt = run.next_slice()
        tune.report(row, checkpoint=tune.Checkpoint.from_directory(str(ckpt)) if ckpt else None)
