"""One trial of cluster/sweep.py: its config, training in slices with a checkpoint and a report after each, the
sweep metric of the model, and the restore from the checkpoint Tune hands back after a failure.

`SweepSetup` is what the driver decides once and every trial reads. The Tune trainables `run_trial` (the trial
trains in its own process) and `run_trial_on_workers` (it drives a Ray Train job whose workers run
`worker_loop`) share the body `train_trial`. This module travels to Ray's workers by value (ray_common.start_ray).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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
    """Forget what a run dir holds past `step` (checkpoints, stats rows): a trial restored from step's checkpoint
    redoes those steps, and must neither resume from nor log twice what the killed attempt left behind."""
    from ddaebm.checkpoint import POINTER, checkpoint_root, complete_checkpoints

    for ckpt in complete_checkpoints(run_dir):
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt, ignore_errors=True)
    (checkpoint_root(run_dir) / POINTER).unlink(missing_ok=True)  # falls back to the newest complete one
    stats = run_dir / "stats.jsonl"
    if stats.is_file():
        rows = [row for row in stats.read_text().splitlines() if json.loads(row)["step"] <= step]
        stats.write_text("".join(row + "\n" for row in rows))


def current_checkpoint(run_dir: Path, step: int) -> Path | None:
    """The run dir's checkpoint of `step`, if that is the newest (a non-finite streak skips the slice's one)."""
    from ddaebm.checkpoint import latest_checkpoint

    latest = latest_checkpoint(run_dir)
    return latest if latest is not None and latest.name == f"step-{step:09d}" else None


def train_in_slices(cfg, run_dir: Path, state: dict | None, rank: int, world: int, every: int,
                    on_slice: Callable) -> None:
    """Train to cfg.train.steps in slices of `every` steps, each ending with a checkpoint; after each slice
    `on_slice(model, start_step, done)` reports. NonFiniteStop propagates."""
    from ddaebm.training.loop import train

    trainer, start = None, state["step"] if state else 0
    while True:
        trainer = train(cfg, run_dir, state if trainer is None else None, rank, world, trainer=trainer,
                        slice_steps=every)
        done = trainer.step >= cfg.train.steps
        on_slice(trainer.model, start, done)
        if done:
            return
        start = trainer.step


# ---------------------------------------------------------------------------------------------- the trial

def train_trial(setup: SweepSetup, params: dict, trial_id: str, rank: int, world: int, checkpoint,
                report: Callable) -> None:
    """The body shared by one-process and Ray Train trials: restore, train in slices, report after each."""
    from ddaebm.training.preemption import NonFiniteStop

    cfg = setup.trial_config(params, trial_id)
    run_dir = setup.run_dir(trial_id)
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None) as ckpt_dir:
        state = restore_state(cfg, run_dir, ckpt_dir, lead=rank == 0)
        resumed_from = state["step"] if state else 0

        def on_slice(model, start, done):
            row = measure(model, run_dir, start, setup)
            if done and rank == 0 and setup.final_eval and setup.metric in TOY_METRICS:
                row.update(final_toy_scores(model, run_dir))
            crash_once(setup, model.step)
            report({**row, "step": model.step, "resumed_from": resumed_from, "finished": int(done)},
                   current_checkpoint(run_dir, model.step))

        try:
            train_in_slices(cfg, run_dir, state, rank, world, setup.report_every, on_slice)
        except NonFiniteStop as err:
            common.log(f"trial {trial_id}: {err}")
            report({setup.metric: math.inf, "step": setup.steps, "resumed_from": resumed_from, "finished": 1,
                    "nonfinite": 1}, None)


def crash_once(setup: SweepSetup, step: int) -> None:
    """Test switch (--crash-once-at): the first trial process to pass that step dies by SIGKILL, once per sweep."""
    at = setup.crash_once_at
    if at and step >= at:
        common.die_once(setup.experiment / "crashed-once", f"--crash-once-at {at}: killing this trial process at "
                                                           f"step {step}")


def run_trial(params: dict, setup: SweepSetup) -> None:
    """A Tune function trainable: the trial trains in this process (dist.backend from CONFIG, one rank)."""
    from ray import tune

    def report(metrics, ckpt):
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(ckpt)) if ckpt else None)

    train_trial(setup, params, tune.get_context().get_trial_id(), 0, 1, tune.get_checkpoint(), report)


def run_trial_on_workers(params: dict, setup: SweepSetup) -> None:
    """A Tune function trainable that trains the trial on setup.shape.workers Ray Train workers (DeepSpeed),
    reporting to Tune through TuneReportCallback."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    loop_config = {"params": params, "setup": setup, "trial_id": trial_id}
    common.torch_trainer(worker_loop, loop_config, setup.shape, timeout_s=600, name=f"{setup.name}-{trial_id}",
                         storage=setup.storage, callbacks=(TuneReportCallback(),)).fit()


def worker_loop(config: dict) -> None:
    """Every Ray Train worker of a trial: the shared body on Ray's process group, rank 0 handing in checkpoints."""
    import ray.train

    env = common.ray_rank_setup("deepspeed")

    def report(metrics, ckpt):
        ckpt = ray.train.Checkpoint.from_directory(str(ckpt)) if ckpt and env.rank == 0 else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"step-{metrics['step']:09d}")

    train_trial(config["setup"], config["params"], config["trial_id"], env.rank, env.world,
                ray.train.get_checkpoint(), report)
