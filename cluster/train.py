#!/usr/bin/env python3
"""One long (multi-node) DDAEBM training as a Ray Train job.

    ray submit cluster/cluster.yaml cluster/train.py -- CONFIG [options] [key=value ...]    on the Ray cluster
    python cluster/train.py --local CONFIG [options] [key=value ...]                        on this machine

--workers ranks (Ray Train workers, one per GPU with --gpus-per-worker 1) run ddaebm's own training loop on the
process group Ray Train starts, with dist.backend from CONFIG (DeepSpeed for more than one worker). The run
directory is --run-dir, else $DDAEBM_RUN_ROOT/<--name or the config's name> (default root <checkout>/runs): the
same place, layout, checkpoints and resume rule as `ddaebm train` and `sbatch slurm/<script>.sh`, so a run
started by one of them continues under another (at another world size too). Running the same command again
resumes from the newest complete checkpoint; when a worker or node dies, Ray Train restarts the worker group
(--max-failures times) and it resumes the same way. Ray Train's own bookkeeping lives in <run dir>/ray.

Exit status as `ddaebm train`: 0 done, 2 bad input (nothing started), 3 stopped on non-finite losses, 1 failed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

CLUSTER = Path(__file__).resolve().parent  # ray_common's folder: see its docstring
if not (CLUSTER / "ray_common.py").is_file():  # `ray submit` ran this file alone as ~/<name>.py
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != CLUSTER]  # a ~/ddaebm would shadow ddaebm
    import ddaebm

    CLUSTER = Path(os.environ.get("DDAEBM_ROOT") or Path(ddaebm.__file__).resolve().parents[1]) / "cluster"
sys.path.insert(0, str(CLUSTER))
import ray_common as common  # noqa: E402

from ddaebm.errors import BadInput  # noqa: E402


def worker_loop(job: dict) -> None:
    """Every Ray Train worker: ddaebm's training loop, as `ddaebm train` runs it, on Ray's process group."""
    import ray.train

    from ddaebm.config import load_config
    from ddaebm.training.loop import prepare_run, train
    from ddaebm.training.preemption import NonFiniteStop

    cfg = load_config(job["config"], job["overrides"])
    env = common.ray_rank_setup(cfg.dist.backend)
    run_dir = Path(job["run_dir"])
    state = prepare_run(cfg, run_dir, "auto", warn=env.lead)  # newest valid checkpoint, also after a restart
    try:
        trainer = None
        if job["crash_once_at"] and (state or {}).get("step", 0) < job["crash_once_at"]:
            trainer = train(cfg, run_dir, state, env.rank, env.world, slice_steps=job["crash_once_at"] - state["step"]
                            if state else job["crash_once_at"])
            common.die_once(run_dir / "ray" / "crashed-once", f"--crash-once-at: killing rank {env.rank}")
        trainer = train(cfg, run_dir, state if trainer is None else None, env.rank, env.world, trainer=trainer)
    except NonFiniteStop as err:  # not a failure to retry: the newest good checkpoint stays, as with the CLI
        common.log(f"rank {env.rank}: {err}")
        return
    rows = common.stats_rows(run_dir) if env.lead else []
    ray.train.report({**{k: v for k, v in (rows[-1] if rows else {}).items() if isinstance(v, (int, float))},
                      "step": trainer.step})


def parse_args(argv=None):
    p = common.script_parser(__doc__)
    p.add_argument("--name", help="run dir name (default: the config's name): <run root>/<name>")
    p.add_argument("--run-dir", help="run directory (default $DDAEBM_RUN_ROOT/<name>, root <checkout>/runs)")
    p.add_argument("--steps", type=int, help="total training iterations (train.steps)")
    common.add_ray_options(p, "ranks (Ray Train workers)", max_failures=3,
                           failures_help="worker-group restarts after a worker/node died")
    args, overrides = common.parse_with_overrides(p, argv)
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    return args, overrides


def plan(args, overrides: list[str]) -> tuple[dict, object]:
    """(the job every worker gets, the config): everything checked before Ray starts (bad input leaves nothing
    behind, as with the CLI)."""
    from ddaebm.config import load_config
    from ddaebm.training.loop import prepare_run

    config = common.resolve_config(args.config)
    cfg = load_config(config, overrides)
    common.check_workers(cfg, common.WorkerShape.of(args))
    # Like slurm/launch.sh with its job name: --name picks the folder, the config keeps its own name.
    run_dir = Path(args.run_dir).resolve() if args.run_dir else common.default_run_root() / (args.name or cfg.name)
    state = prepare_run(cfg, run_dir, "auto", warn=True)  # a run dir of another experiment is refused here
    common.log(f"{'resuming from step ' + str(state['step']) if state else 'starting'} in {run_dir} on "
               f"{args.workers} Ray Train worker(s)")
    job = {"config": str(config), "overrides": overrides, "run_dir": str(run_dir), "crash_once_at": args.crash_once_at}
    return job, cfg


def reached_step(run_dir: Path) -> int:
    """The step of the run's newest complete checkpoint (0 without one)."""
    from ddaebm.checkpoint import latest_checkpoint

    latest = latest_checkpoint(run_dir)
    return int(latest.name.split("-")[1]) if latest else 0


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    try:
        job, cfg = plan(args, overrides)
    except BadInput as err:
        return common.usage_error("train", err)
    common.start_ray(args.local, args.num_cpus)
    shape = common.WorkerShape.of(args)
    try:
        common.check_cluster_fits(shape.workers * shape.cpus_per_worker, shape.workers * shape.gpus_per_worker,
                                  "the job")
    except BadInput as err:
        return common.usage_error("train", err)
    trainer = common.torch_trainer(worker_loop, job, common.WorkerShape.of(args), cfg.dist.timeout_s, name="ray",
                                   storage=job["run_dir"])
    try:
        trainer.fit()
    except Exception as err:  # noqa: BLE001 - Ray's TrainingFailedError and friends, after the restarts
        print(f"train: error: the Ray Train job failed: {err}", file=sys.stderr)
        return common.EXIT_FAILED
    step = reached_step(Path(job["run_dir"]))
    if step < cfg.train.steps:
        print(f"train: error: stopped at step {step} of {cfg.train.steps} (non-finite losses; see the log)",
              file=sys.stderr)
        return common.EXIT_NONFINITE
    common.log(f"done: step {step} in {job['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
