#!/usr/bin/env python3
"""Ray Tune sweep over DDAEBM's importance weight w(t) (α, β), the R1 weight γ and the β schedule, with ASHA.

    python cluster/sweep.py --local CONFIG [options] [key=value ...]                        on this machine
    ray submit cluster/cluster.yaml cluster/sweep.py -- CONFIG [options] [key=value ...]    on the Ray cluster

Every trial trains CONFIG + the fixed key=value overrides + its own values of the swept keys (loss.iw_alpha,
loss.iw_beta, loss.r1_gamma, diffusion.grid and the β schedule of CONFIG's diffusion.variance: beta_min and
beta_max, or the explicit variances; --space/--param change the set; the plan is printed before the start, and
--dry-run prints it alone) for --steps steps, in slices of --report-every steps. After each slice it checkpoints
(ddaebm's checkpoint, handed to Tune, which copies it to --storage) and reports the metric, so ASHA can stop it
at a rung and a trial whose process dies restarts from its last report (FailureConfig). Running the same command
again resumes an interrupted sweep (Tuner.restore). At the end the best trial's config (the lowest metric among
the trials that ran the whole budget) is written as a YAML that `ddaebm train` accepts (with CONFIG's
train.steps, not the sweep's budget), and summary.json lists every trial, failed ones with their reason.

Metrics (lower is better): toy data: mmd2 (default) or sliced_w1 (ddaebm/metrics/toy.py, on --eval-num samples);
images: fid (ddaebm/metrics/fid.py, --eval-num samples against cached reference statistics of the training
split) or l_rec (the mean reconstruction loss of the slice's log rows: cheap, but a training loss, not a sample
quality). A trial that stops on non-finite losses reports inf.

--workers N > 1 trains each trial on N ranks with dist.backend=deepspeed: Ray actors in the trial's own placement
group, which Tune reserves with the trial and removes when it ends or is stopped (sweep_ranks.py).
SIGINT, SIGTERM and SIGHUP end the sweep gracefully within GRACE_S seconds, exit status 130 (StopSignals).
Run directories of the trials: <storage>/<name>/runs/<trial id> (ddaebm layout: stats.jsonl, checkpoints, plots).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

CLUSTER = Path(__file__).resolve().parent  # ray_common's folder: see its docstring
if not (CLUSTER / "ray_common.py").is_file():  # `ray submit` ran this file alone as ~/<name>.py
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != CLUSTER]  # a ~/ddaebm would shadow ddaebm
    import ddaebm

    CLUSTER = Path(os.environ.get("DDAEBM_ROOT") or Path(ddaebm.__file__).resolve().parents[1]) / "cluster"
sys.path.insert(0, str(CLUSTER))
import ray_common as common  # noqa: E402
from sweep_space import example_point, param_overrides, read_space, space_lines, tune_domains  # noqa: E402
from sweep_ranks import DRIVER_CPU, run_trial_on_workers, trial_cpus, trial_resources  # noqa: E402
from sweep_trial import METRICS, TOY_METRICS, SweepSetup, run_trial  # noqa: E402

from ddaebm.errors import BadInput  # noqa: E402

GRACE_S = 60  # after a stop signal: Tune's last save and the trials' stop, before the driver leaves regardless


# ---------------------------------------------------------------------------------------------- the plan

def parse_args(argv=None):
    p = common.script_parser(__doc__)
    p.add_argument("--name", help="experiment name (default sweep-<config name>); the same name resumes")
    p.add_argument("--storage", help="Tune storage path, shared by all nodes (default $DDAEBM_RUN_ROOT/sweeps "
                                     "or <checkout>/runs/sweeps)")
    p.add_argument("--samples", type=int, default=16, help="trials drawn from the space (times each grid point)")
    p.add_argument("--steps", type=int, help="training steps per trial (default CONFIG's train.steps)")
    p.add_argument("--report-every", type=int, help="steps per slice: checkpoint + metric (default steps/8)")
    p.add_argument("--grace", type=int, default=1, help="ASHA grace period in slices")
    p.add_argument("--reduction", type=float, default=2, help="ASHA reduction factor")
    p.add_argument("--metric", choices=("auto", *METRICS), default="auto",
                   help="auto: mmd2 on toy data, fid on images")
    p.add_argument("--eval-num", type=int, default=2000, help="samples per metric evaluation")
    p.add_argument("--no-final-eval", dest="final_eval", action="store_false",
                   help="skip `ddaebm eval toy` at the end of a trial that runs to --steps")
    p.add_argument("--space", help="YAML/JSON file or string {key: [uniform|loguniform|choice|grid, ...]} "
                                   "replacing the default space")
    p.add_argument("--param", action="append", default=[], metavar="KEY=KIND:V1,V2",
                   help="a swept key, e.g. loss.r1_gamma=loguniform:1e-4,1e-1 or diffusion.grid=choice:eps,drl "
                        "or loss.r1_gamma_scale=grid:[20,5,1,1],[1,1,1,1] (repeatable; with --param or --space "
                        "only the keys named are swept)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random search")
    p.add_argument("--max-concurrent", type=int, default=0, help="trials at once (default: as resources allow)")
    p.add_argument("--best-out", help="best config YAML (default <storage>/<name>/best.yaml)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (search space, budget, resources, storage) and exit without starting Ray")
    common.add_ray_options(p, ">1: Ray Train workers per trial, dist.backend=deepspeed", max_failures=1,
                           failures_help="restarts of a trial whose process died")
    return common.parse_with_overrides(p, argv)


def make_setup(args, overrides: list[str]) -> tuple[SweepSetup, dict]:
    """The sweep's setup and search space, with everything checked that can be before Ray starts."""
    from ddaebm.config import load_config
    from ddaebm.data.stream import is_toy

    config = common.resolve_config(args.config)
    cfg = load_config(config, overrides)  # bad overrides fail here, before Ray starts
    steps = args.steps or cfg.train.steps
    space = read_space(args.space, args.param, cfg)
    shape = common.WorkerShape.of(args)
    name = args.name or f"sweep-{cfg.name}"
    setup = SweepSetup(config=config, overrides=tuple(overrides), space_keys=tuple(sorted(space)), steps=steps,
                       report_every=args.report_every or max(1, steps // 8),
                       metric=sweep_metric(args.metric, is_toy(cfg)), eval_num=args.eval_num,
                       final_eval=args.final_eval, shape=shape, name=name,
                       storage=Path(args.storage or default_storage()).resolve(),
                       crash_once_at=args.crash_once_at)
    common.check_workers(setup.trial_config(example_point(space), name), shape)  # the swept keys exist, too
    if args.local:
        check_local_cpus(shape, args.num_cpus or os.cpu_count())
    return setup, space


def default_storage() -> Path:
    """$DDAEBM_RUN_ROOT/sweeps (cluster.yaml sets it to the nodes' shared storage), else runs/sweeps in the current
    folder, as `ddaebm train` puts runs/<name> there: never inside some other checkout."""
    root = os.environ.get("DDAEBM_RUN_ROOT")
    return Path(root) / "sweeps" if root else Path("runs") / "sweeps"


def sweep_metric(asked: str, toy: bool) -> str:
    """--metric, with auto resolved (mmd2 on toy data, fid on images), refused where it does not fit the data."""
    metric = asked if asked != "auto" else ("mmd2" if toy else "fid")
    if toy != (metric in TOY_METRICS) and metric != "l_rec":
        raise BadInput(f"--metric {metric} does not fit {'toy' if toy else 'image'} data")
    if metric == "fid":
        try:
            import ddaebm.metrics.fid  # noqa: F401
            import ddaebm.metrics.inception  # noqa: F401
        except ImportError as err:
            raise BadInput(f"--metric fid needs ddaebm/metrics/fid.py ({err}); use --metric l_rec") from None
    return metric


def check_local_cpus(shape: common.WorkerShape, have: int) -> None:
    """A private Ray that cannot place one trial would wait for ever: refuse it instead."""
    need = trial_cpus(shape)
    if need > have:
        raise BadInput(f"one trial needs {need:g} logical CPUs (--workers x --cpus-per-worker), Ray here has "
                       f"{have}: raise --num-cpus (logical) or lower --cpus-per-worker")


def plan_lines(args, setup: SweepSetup, space: dict) -> str:
    """What the sweep will do, printed before Ray starts: the space, the budget, a trial's resources, the storage."""
    shape = setup.shape
    rank = f"{shape.cpus_per_worker:g} CPU" + (f" + {shape.gpus_per_worker:g} GPU" if shape.gpus_per_worker else "")
    holds = (f"{shape.workers} ranks of {rank} + {DRIVER_CPU} CPU for the trial itself" if shape.workers > 1
             else rank)
    return "\n".join([f"sweep {setup.name}: {setup.config} ({setup.metric}, minimised), {args.samples} sample(s), "
                      f"{setup.steps} steps per trial in slices of {setup.report_every}, ASHA",
                      "search space:", *space_lines(space),
                      f"each trial holds {holds}; at most {args.max_concurrent or 'as many as fit'} at once",
                      f"storage: {setup.experiment}"])


# ---------------------------------------------------------------------------------------------- Tune

def trainable(setup: SweepSetup):
    """The trial function with its setup and resources: on its own (CPUs/GPUs of one worker), or driving its
    ranks, whose bundles Tune reserves with the trial (sweep_ranks.py says why)."""
    from ray import tune

    shape = setup.shape
    if shape.workers > 1:
        return tune.with_resources(tune.with_parameters(run_trial_on_workers, setup=setup), trial_resources(shape))
    return tune.with_resources(tune.with_parameters(run_trial, setup=setup),
                               {"cpu": shape.cpus_per_worker, "gpu": shape.gpus_per_worker})


def build_tuner(args, setup: SweepSetup, space: dict):
    """(the Tuner, whether it resumes): Tuner.restore of the experiment when it exists, else a new ASHA sweep."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    path = str(setup.experiment)
    if tune.Tuner.can_restore(path):
        common.log(f"resuming the sweep in {path} (Tuner.restore)")
        return tune.Tuner.restore(path, trainable(setup), resume_unfinished=True, resume_errored=True), True
    scheduler = ASHAScheduler(time_attr="step", max_t=setup.steps, grace_period=args.grace * setup.report_every,
                              reduction_factor=args.reduction)
    tuner = tune.Tuner(
        trainable(setup), param_space=tune_domains(space),
        tune_config=tune.TuneConfig(metric=setup.metric, mode="min", scheduler=scheduler, num_samples=args.samples,
                                    search_alg=BasicVariantGenerator(max_concurrent=args.max_concurrent,
                                                                     random_state=args.seed)),
        run_config=tune.RunConfig(name=setup.name, storage_path=str(setup.storage), verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=setup.shape.max_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2)))
    return tuner, False


def fit(tuner, setup: SweepSetup):
    """tuner.fit(), and whether it was interrupted (see StopSignals)."""
    with StopSignals(setup.experiment / "driver.log") as signals:
        results = tuner.fit()
        return results, signals.interrupted()


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP end a sweep gracefully, within GRACE_S seconds, with exit status 130.

    Tune's own SIGINT (and SIGUSR1) handler sets its stop flag, and Tune then saves its state and stops the
    trials (which removes their placement groups, ranks included); the handler puts back the one it found, ours:
    that is how an interruption shows, here and to a watchdog thread. SIGTERM (a batch scheduler's stop) and
    SIGHUP (the terminal or the ssh connection of `ray submit` gone) are turned into SIGINT; after SIGHUP the
    driver's output goes to `log`, since writing to a closed terminal would fail. A second signal, or a graceful
    stop that has not ended GRACE_S seconds after the first signal, ends the driver at once (Ray shut down, exit
    130): the trials then resume from their last checkpoints, as after a crash.
    """

    def __init__(self, log: Path):
        self.log, self.done, self.previous = log, threading.Event(), {}

    def __enter__(self):
        handlers = {signal.SIGINT: self.again, signal.SIGTERM: self.relay, signal.SIGHUP: self.relay}
        self.previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
        threading.Thread(target=self.watch, name="sweep-stop-watchdog", daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def interrupted(self) -> bool:
        return signal.getsignal(signal.SIGINT) == self.again

    def again(self, signum, frame):
        """SIGINT while ours is the handler: before Tune took over, or after its handler ran once."""
        leave_now(f"{signal.Signals(signum).name} while stopping")

    def relay(self, signum, frame):
        if signum == signal.SIGHUP:
            redirect_output(self.log)
        common.log(f"{signal.Signals(signum).name}: stopping the sweep as on SIGINT")
        if self.interrupted():
            leave_now(f"{signal.Signals(signum).name} while stopping")
        os.kill(os.getpid(), signal.SIGINT)

    def watch(self):
        """Wait until Tune has taken SIGINT over, then until it has handed it back (a stop signal came): from
        then on the sweep has GRACE_S seconds to end."""
        while self.interrupted():  # ours, until tuner.fit() installs Tune's
            if self.done.wait(0.2):
                return
        while not self.interrupted():
            if self.done.wait(0.2):
                return
        common.log(f"stop signal: Tune saves its state and stops the trials (at most {GRACE_S} s)")
        if not self.done.wait(GRACE_S):
            leave_now(f"the sweep did not stop within {GRACE_S} s")


def leave_now(reason: str) -> None:
    """End the driver at once: Ray shut down (a local Ray's processes with it; on a cluster, this job's actors),
    exit status 130. Tune's state is the one it saved last; trials resume from their last checkpoints."""
    print(f"sweep: {reason}: leaving now; run the same command again to resume the sweep", file=sys.stderr,
          flush=True)

    def shutdown():
        import ray

        ray.shutdown()

    t = threading.Thread(target=shutdown, daemon=True)
    t.start()
    t.join(20)
    os._exit(130)


def redirect_output(log: Path) -> None:
    """Send this process's stdout and stderr (and what Ray relays from its workers) to `log`, appended."""
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:
        fd = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


# ---------------------------------------------------------------------------------------------- the outcome

def best_result(results, setup: SweepSetup):
    """The trial with the lowest last metric among those that ran the whole budget: an ASHA-stopped trial's
    metric comes from fewer steps and is not comparable (at toy size an early figure can beat every finished
    one). Among all trials that reported when none finished; a NaN/Inf metric ranks last."""
    metric = setup.metric

    def value(r) -> float:
        v = r.metrics[metric]
        return v if math.isfinite(v) else math.inf

    reported = [r for r in results if r.error is None and r.metrics and r.metrics.get(metric) is not None]
    finished = [r for r in reported if r.metrics.get("step") == setup.steps]
    return min(finished or reported, key=value)


def best_yaml(best, setup: SweepSetup) -> str:
    """The best trial's config as `ddaebm train` reads it: CONFIG + fixed overrides + its values, with CONFIG's
    train.steps rather than the sweep's budget."""
    from ddaebm.config import load_config, to_yaml

    params = {k: best.config[k] for k in setup.space_keys}
    name = f"{setup.config.stem}-{setup.name}-best"
    cfg = load_config(setup.config, [*setup.overrides, *param_overrides(params), *setup.backend_overrides()],
                      name=name)
    header = (f"# Best of Ray Tune sweep '{setup.name}' ({setup.experiment}): {setup.metric} = "
              f"{best.metrics[setup.metric]:.6g} at step {best.metrics['step']} of {setup.steps}, trial "
              f"{best.metrics['trial_id']}.\n# Swept values: {json.dumps(params)}\n"
              f"# Train it: ddaebm train THIS_FILE   (SLURM: DDAEBM_CONFIG=THIS_FILE sbatch slurm/<script>.sh)\n")
    return header + to_yaml(cfg)


def summarize(results, setup: SweepSetup, complete: bool) -> list[dict]:
    """One row per trial; `early_stopped` (ASHA stopped it before --steps) only means that in a complete sweep."""
    trials = []
    for r in results:
        m = r.metrics or {}
        trials.append({"trial_id": m.get("trial_id") or Path(r.path).name, "config": r.config or {},
                       "step": m.get("step", 0), setup.metric: m.get(setup.metric),
                       "resumed_from": m.get("resumed_from", 0), "error": str(r.error) if r.error else None,
                       "early_stopped": complete and bool(m) and not m.get("finished") and r.error is None})
    return trials


def trial_lines(trials: list[dict], setup: SweepSetup) -> list[str]:
    """The table printed at the end: best first, then worse, then trials without a metric."""
    metric, lines = setup.metric, []
    for t in sorted(trials, key=lambda t: (t[metric] is None, t[metric] or 0)):
        flag = "error" if t["error"] else "stopped early" if t["early_stopped"] else "finished"
        lines.append(f"{t['trial_id']}  {metric} {t[metric]}  step {t['step']}  {flag}  "
                     f"{json.dumps({k: t['config'].get(k) for k in setup.space_keys})}")
    return lines


def write_outcome(args, results, trials: list[dict], setup: SweepSetup, resumed: bool, t0: float) -> int:
    """summary.json, the table, the failed trials' reasons and best.yaml; EXIT_FAILED when no trial reported a
    metric."""
    ok = [t for t in trials if t[setup.metric] is not None and t["error"] is None]
    best = best_result(results, setup) if ok else None
    out = Path(args.best_out or setup.experiment / "best.yaml")
    summary = {"name": setup.name, "metric": setup.metric, "steps": setup.steps, "resumed": resumed,
               "wall_s": round(time.time() - t0, 1), "best": best.metrics["trial_id"] if best else None,
               "best_yaml": str(out) if best else None, "trials": trials}
    (setup.experiment / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print("\n".join(trial_lines(trials, setup)))
    failed = [t for t in trials if t["error"]]
    for t in failed:
        print(f"failed: {t['trial_id']} after {setup.shape.max_failures + 1} attempt(s) (--max-failures "
              f"{setup.shape.max_failures}): {error_reason(t['error'])}")
    if best is None:
        print(f"sweep: error: no trial reported a metric ({summary['wall_s']} s)", file=sys.stderr)
        return common.EXIT_FAILED
    out.write_text(best_yaml(best, setup))
    print(f"best: {best.metrics['trial_id']} {setup.metric}={best.metrics[setup.metric]:.6g}; "
          f"config written to {out} ({summary['wall_s']} s)")
    return 0


def error_reason(text: str) -> str:
    """The line of a trial's error that says why: the last non-empty one of Ray's traceback."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    try:
        setup, space = make_setup(args, overrides)
    except BadInput as err:
        return common.usage_error("sweep", err)
    t0 = time.time()
    print(plan_lines(args, setup, space), flush=True)
    if args.dry_run:
        return 0
    common.start_ray(args.local, args.num_cpus)
    try:
        common.check_cluster_fits(trial_cpus(setup.shape), setup.shape.workers * setup.shape.gpus_per_worker,
                                  "one trial")
    except BadInput as err:
        return common.usage_error("sweep", err)
    setup.experiment.mkdir(parents=True, exist_ok=True)
    tuner, resumed = build_tuner(args, setup, space)
    results, interrupted = fit(tuner, setup)
    trials = summarize(results, setup, not interrupted)
    if interrupted:
        print(f"sweep: interrupted; Tune saved its state in {setup.experiment}: run the same command again to "
              "resume the sweep", file=sys.stderr)
        return 130
    return write_outcome(args, results, trials, setup, resumed, t0)


if __name__ == "__main__":
    sys.exit(main())
