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

import argparse
import os
import sys
from pathlib import Path


def _import_common():
    """cluster/ray_common.py from beside this file, else from the checkout of the installed ddaebm."""
    here = Path(__file__).resolve().parent
    if not (here / "ray_common.py").is_file():
        # `ray submit` runs this file as ~/<name>.py beside the synced checkout ~/ddaebm, which would shadow the
        # installed package (as a namespace package) if the script's folder stayed first on the path.
        sys.path = [p for p in sys.path if Path(p or ".").resolve() != here]
        import ddaebm

        here = Path(os.environ.get("DDAEBM_ROOT") or Path(ddaebm.__file__).resolve().parents[1]) / "cluster"
    sys.path.insert(0, str(here))
    import ray_common
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(ray_common)  # workers get its code with the training function
    return ray_common


common = _import_common()


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
            crash_once(run_dir, env.rank)
        trainer = train(cfg, run_dir, state if trainer is None else None, env.rank, env.world, trainer=trainer)
    except NonFiniteStop as err:  # not a failure to retry: the newest good checkpoint stays, as with the CLI
        common.log(f"rank {env.rank}: {err}")
        return
    rows = common.stats_rows(run_dir) if env.lead else []
    ray.train.report({**{k: v for k, v in (rows[-1] if rows else {}).items() if isinstance(v, (int, float))},
                      "step": trainer.step})


def crash_once(run_dir: Path, rank: int) -> None:
    """Test switch (--crash-once-at): one worker dies by SIGKILL after that step's checkpoint, once per run dir."""
    import signal

    try:
        os.close(os.open(run_dir / "ray" / "crashed-once", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    common.log(f"--crash-once-at: killing rank {rank}")
    os.kill(os.getpid(), signal.SIGKILL)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("config", help="ddaebm config (relative to the cwd or the checkout)")
    p.add_argument("--name", help="run dir name (default: the config's name): <run root>/<name>")
    p.add_argument("--run-dir", help="run directory (default $DDAEBM_RUN_ROOT/<name>, root <checkout>/runs)")
    p.add_argument("--steps", type=int, help="total training iterations (train.steps)")
    p.add_argument("--workers", type=int, default=1, help="ranks (Ray Train workers)")
    p.add_argument("--cpus-per-worker", type=float, default=1)
    p.add_argument("--gpus-per-worker", type=float, default=0, help="1 on GPU nodes: one GPU per rank")
    p.add_argument("--max-failures", type=int, default=3, help="worker-group restarts after a worker/node died")
    p.add_argument("--local", action="store_true", help="start a private Ray here instead of joining the cluster")
    p.add_argument("--num-cpus", type=int, help="--local: logical CPUs Ray may use (default all)")
    p.add_argument("--crash-once-at", type=int, help=argparse.SUPPRESS)  # tests: SIGKILL one worker once
    args, overrides = p.parse_known_args(argv)
    bad = [a for a in overrides if a.startswith("-") or "=" not in a]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    return args, overrides


def plan(args, overrides: list[str]) -> tuple[dict, object]:
    """Everything checked before Ray starts (bad input leaves nothing behind, as with the CLI)."""
    from ddaebm.config import ConfigError, load_config
    from ddaebm.training.loop import prepare_run

    config = common.resolve_config(args.config)
    cfg = load_config(config, overrides)
    if cfg.data.batch % args.workers:
        raise ConfigError(f"data.batch={cfg.data.batch} is the global batch and must divide over the "
                          f"{args.workers} workers")
    if cfg.dist.backend == "torch" and args.workers > 1:
        raise ConfigError(f"dist.backend=torch trains in one process; add dist.backend=deepspeed for {args.workers} "
                          "workers")
    # Like slurm/launch.sh with its job name: --name picks the folder, the config keeps its own name.
    run_dir = Path(args.run_dir).resolve() if args.run_dir else common.default_run_root() / (args.name or cfg.name)
    state = prepare_run(cfg, run_dir, "auto", warn=True)  # a run dir of another experiment is refused here
    common.log(f"{'resuming from step ' + str(state['step']) if state else 'starting'} in {run_dir} on "
               f"{args.workers} Ray Train worker(s)")
    job = {"config": str(config), "overrides": overrides, "run_dir": str(run_dir), "crash_once_at": args.crash_once_at}
    return job, cfg


def main(argv=None) -> int:
    from ddaebm.config import ConfigError
    from ddaebm.training.checkpoint import CheckpointError, latest_checkpoint

    args, overrides = parse_args(argv)
    try:
        job, cfg = plan(args, overrides)
    except (ConfigError, CheckpointError, ValueError) as err:
        print(f"train: error: {err}", file=sys.stderr)
        return common.EXIT_USAGE
    common.start_ray(args.local, args.num_cpus)
    from ray import train
    from ray.train.torch import TorchConfig, TorchTrainer

    gpus = args.gpus_per_worker
    trainer = TorchTrainer(
        worker_loop, train_loop_config=job,
        scaling_config=train.ScalingConfig(num_workers=args.workers, use_gpu=gpus > 0,
                                           resources_per_worker={"CPU": args.cpus_per_worker, "GPU": gpus}),
        torch_config=TorchConfig(timeout_s=cfg.dist.timeout_s),
        run_config=train.RunConfig(name="ray", storage_path=job["run_dir"],
                                   failure_config=train.FailureConfig(max_failures=args.max_failures)))
    try:
        trainer.fit()
    except Exception as err:  # noqa: BLE001 - Ray's TrainingFailedError and friends, after the restarts
        print(f"train: error: the Ray Train job failed: {err}", file=sys.stderr)
        return common.EXIT_FAILED
    latest = latest_checkpoint(Path(job["run_dir"]))
    step = int(latest.name.split("-")[1]) if latest else 0
    if step < cfg.train.steps:
        print(f"train: error: stopped at step {step} of {cfg.train.steps} (non-finite losses; see the log)",
              file=sys.stderr)
        return common.EXIT_NONFINITE
    common.log(f"done: step {step} in {job['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
