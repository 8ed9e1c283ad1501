#!/usr/bin/env python3
"""Ray Tune sweep over DDAEBM's importance weight w(t) (α, β), the R1 weight γ and the β schedule, with ASHA.

    python cluster/sweep.py --local CONFIG [options] [key=value ...]                        on this machine
    ray submit cluster/cluster.yaml cluster/sweep.py -- CONFIG [options] [key=value ...]    on the Ray cluster

Every trial trains CONFIG + the fixed key=value overrides + its own values of the swept keys (loss.iw_alpha,
loss.iw_beta, loss.r1_gamma, diffusion.beta_min, diffusion.beta_max, diffusion.grid; --space changes the set)
for --steps steps, in slices of --report-every steps. After each slice it checkpoints (ddaebm's checkpoint,
handed to Tune, which copies it to --storage) and reports the metric, so ASHA can stop it at a rung and a trial
whose process dies restarts from its last report (FailureConfig). Running the same command again resumes an
interrupted sweep (Tuner.restore). At the end the best trial's config (the lowest metric among the trials that
ran the whole budget) is written as a YAML that `ddaebm train` accepts (with CONFIG's train.steps, not the
sweep's budget), and summary.json lists every trial.

Metrics (lower is better): toy data: mmd2 (default) or sliced_w1 (ddaebm/metrics/toy.py, on --eval-num samples);
images: fid (ddaebm/metrics/fid.py, --eval-num samples against cached reference statistics of the training
split) or l_rec (the mean reconstruction loss of the slice's log rows: cheap, but a training loss, not a sample
quality). A trial that stops on non-finite losses reports inf.

--workers N > 1 trains each trial on N Ray Train workers (TorchTrainer) with dist.backend=deepspeed.
Run directories of the trials: <storage>/<name>/runs/<trial id> (ddaebm layout: stats.jsonl, checkpoints, plots).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time
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

    cloudpickle.register_pickle_by_value(ray_common)  # workers get its code with the trial function
    return ray_common


common = _import_common()
METRICS = ("mmd2", "sliced_w1", "fid", "l_rec")
DRIVER_CPU = 0.01  # logical CPU of a trial that drives Ray Train workers


# ---------------------------------------------------------------------------------------------- search space

def default_space(cfg) -> dict:
    """Ranges around CONFIG: w(t)'s α and β (paper LSUN (0.6, 0.2), default (1, 1)), γ within ×/÷10 of
    CONFIG's, and the β schedule in the units of CONFIG's diffusion.variance."""
    d, gamma = cfg.diffusion, cfg.loss.r1_gamma
    space = {"loss.iw_alpha": ["loguniform", 0.2, 2.0],
             "loss.iw_beta": ["loguniform", 0.1, 2.0],
             "loss.r1_gamma": ["loguniform", gamma / 10, gamma * 10] if gamma > 0 else ["loguniform", 1e-4, 0.1],
             "diffusion.grid": ["choice", "eps", "drl"]}
    if d.variance == "vp":  # β(t) from beta_min to beta_max (SPEC §1.3)
        space["diffusion.beta_min"] = ["loguniform", 0.01, 1.0]
        space["diffusion.beta_max"] = ["uniform", 5.0, 20.0]
    elif d.variance == "geometric":  # variances beta_min … beta_max, which must stay below 1
        space["diffusion.beta_min"] = ["loguniform", d.beta_min / 10, min(d.beta_min * 10, 0.01)]
        space["diffusion.beta_max"] = ["choice", 0.99, 0.999, 0.9999]
    return space


def tune_domains(space: dict) -> dict:
    """{key: [kind, *args]} → Tune domains; kinds uniform, loguniform, choice, grid; a plain value is fixed."""
    from ray import tune

    kinds = {"uniform": tune.uniform, "loguniform": tune.loguniform,
             "choice": lambda *v: tune.choice(list(v)), "grid": lambda *v: tune.grid_search(list(v))}
    out = {}
    for key, spec in space.items():
        if isinstance(spec, list) and spec and spec[0] in kinds:
            out[key] = kinds[spec[0]](*spec[1:])
        elif isinstance(spec, (list, dict)):
            raise ValueError(f"--space {key}: expected [uniform|loguniform|choice|grid, ...] or a value, got {spec}")
        else:
            out[key] = spec
    return out


def read_space(text: str | None, params: list[str], cfg) -> dict:
    """--space (file or string) plus the --param entries; CONFIG's default space when neither is given. Values
    are read as config overrides are (OmegaConf's YAML: 1e-4 is a number, [20,5,1,1] a list)."""
    from omegaconf import OmegaConf

    if text is None and not params:
        return default_space(cfg)
    space = {}
    if text is not None:
        path = Path(text)
        try:
            space = OmegaConf.to_container(OmegaConf.create(path.read_text() if path.is_file() else text))
        except Exception as err:  # yaml's and OmegaConf's parse errors share no base class
            raise ValueError(f"--space: cannot read {text!r}: {' '.join(str(err).split())}") from None
        if not isinstance(space, dict):
            raise ValueError("--space must be a mapping {key: [kind, ...]} (a YAML/JSON file or string)")
    for item in params:  # KEY=KIND:V1,V2,... — no spaces or quotes, so it survives `ray submit`'s shell
        key, _, spec = item.partition("=")
        kind, _, values = spec.partition(":")
        if not key or kind not in ("uniform", "loguniform", "choice", "grid") or not values:
            raise ValueError(f"--param {item}: expected KEY=KIND:V1,V2,... with KIND uniform, loguniform, choice "
                             "or grid")
        space[key] = [kind, *(OmegaConf.to_container(OmegaConf.from_dotlist([f"v={v}"]))["v"]
                              for v in split_values(values, item))]
    return space


def split_values(values: str, item: str) -> list[str]:
    """V1,V2,... split at the commas outside brackets, so that a value may be a list:
    loss.r1_gamma_scale=choice:[20,5,1,1],[1,1,1,1] sweeps two lists."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(values):
        depth += (ch in "[{") - (ch in "]}")
        if depth < 0:
            break
        if ch == "," and depth == 0:
            parts.append(values[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"--param {item}: unbalanced brackets in {values!r}")
    parts.append(values[start:])
    if any(not part for part in parts):
        raise ValueError(f"--param {item}: an empty value in {values!r}")
    return parts


def param_overrides(params: dict) -> list[str]:
    return [f"{key}={value}" for key, value in sorted(params.items())]


# ---------------------------------------------------------------------------------------------- one trial

def trial_config(setup: dict, params: dict, trial_id: str):
    from ddaebm.config import load_config

    extra = [f"train.steps={setup['steps']}", "train.eval_at_end=false"]
    if setup["workers"] > 1:
        extra.append("dist.backend=deepspeed")
    return load_config(setup["config"], setup["overrides"] + param_overrides(params) + extra, name=trial_id)


def measure(trainer, run_dir: Path, metric: str, start: int, setup: dict) -> dict:
    """The sweep metric (and its companions) of the trainer's current model."""
    if metric in ("mmd2", "sliced_w1"):
        import torch

        from ddaebm.data.toy import sample_toy, toy_modes
        from ddaebm.evaluate import generate
        from ddaebm.metrics.toy import mmd2, mode_stats, sliced_w1

        num, dataset = setup["eval_num"], trainer.cfg.data.dataset
        x = generate(trainer, num, seed=0).cpu().numpy()
        data = sample_toy(dataset, num, torch.Generator().manual_seed(10_000)).numpy()
        out = {"mmd2": mmd2(x, data), "sliced_w1": sliced_w1(x, data)}
        modes = toy_modes(dataset)
        if modes is not None:
            out.update(mode_stats(x, modes[0].numpy(), modes[1]))
        return out
    if metric == "fid":
        return {"fid": image_fid(trainer, setup["eval_num"])}
    rows = common.stats_rows(run_dir, start)
    return {"l_rec": sum(r["L_rec"] for r in rows) / len(rows) if rows else math.inf}


def image_fid(trainer, num: int) -> float:
    """FID of `num` samples against the training split (reference statistics cached by ddaebm/metrics/fid.py).

    The hook for image sweeps: replace this function to score with another metric (it gets the live Trainer).
    """
    from ddaebm.data.stream import resolution
    from ddaebm.metrics.fid import fid_of_model, reference_stats
    from ddaebm.metrics.inception import FeatureExtractor

    cfg = trainer.cfg
    extractor = FeatureExtractor(device=trainer.device)
    ref, _, _ = reference_stats(cfg.data.root, cfg.data.dataset, cfg.data.split, resolution(cfg), cfg.model.channels,
                                extractor, loader=cfg.data.loader)
    return fid_of_model(trainer, ref, num, batch=64, extractor=extractor)


def crash_once(setup: dict, step: int) -> None:
    """Test switch (--crash-once-at): the first trial process to pass that step dies by SIGKILL, once per sweep."""
    at = setup["crash_once_at"]
    if not at or step < at:
        return
    try:
        os.close(os.open(Path(setup["experiment"]) / "crashed-once", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    common.log(f"--crash-once-at {at}: killing this trial process at step {step}")
    os.kill(os.getpid(), signal.SIGKILL)


def restore_state(cfg, run_dir: Path, checkpoint_dir: str | None, lead: bool = True):
    """The state to continue from: the checkpoint Ray handed back (the run dir rewound to it), or a fresh run.
    Rank 0 tidies the run dir; the others wait for it."""
    import shutil

    from ddaebm import distributed
    from ddaebm.training.checkpoint import load_checkpoint
    from ddaebm.training.loop import prepare_run

    if lead and checkpoint_dir is None:
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh trial: nothing of an attempt that never reported
    elif lead:
        common.rewind(run_dir, load_checkpoint(checkpoint_dir)["step"])
    distributed.barrier()
    return None if checkpoint_dir is None else prepare_run(cfg, run_dir, resume=checkpoint_dir, warn=lead)


def train_trial(setup: dict, params: dict, trial_id: str, rank: int, world: int, checkpoint, report) -> None:
    """The body shared by one-process and Ray Train trials: restore, train in slices, report after each."""
    from ddaebm.training.preemption import NonFiniteStop

    cfg = trial_config(setup, params, trial_id)
    run_dir = Path(setup["experiment"]) / "runs" / trial_id
    metric = setup["metric"]
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None) as ckpt_dir:
        state = restore_state(cfg, run_dir, ckpt_dir, lead=rank == 0)
        resumed_from = state["step"] if state else 0

        def on_chunk(trainer, start, done):
            row = measure(trainer, run_dir, metric, start, setup)
            if done and rank == 0 and setup["final_eval"] and metric in ("mmd2", "sliced_w1"):
                from ddaebm.evaluate import evaluate_toy  # plots and metric-toy.jsonl in the run dir

                final = evaluate_toy(trainer, run_dir)
                row.update({f"final_{k}": v for k, v in final.items() if isinstance(v, (int, float))})
            crash_once(setup, trainer.step)
            report({**row, "step": trainer.step, "resumed_from": resumed_from, "finished": int(done)},
                   common.current_checkpoint(run_dir, trainer.step))

        try:
            common.train_in_chunks(cfg, run_dir, state, rank, world, setup["report_every"], on_chunk)
        except NonFiniteStop as err:
            common.log(f"trial {trial_id}: {err}")
            report({metric: math.inf, "step": setup["steps"], "resumed_from": resumed_from, "finished": 1,
                    "nonfinite": 1}, None)


def run_trial(params: dict, setup: dict) -> None:
    """A Tune function trainable: the trial trains in this process (dist.backend from CONFIG, one rank)."""
    from ray import tune

    def report(metrics, ckpt):
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(ckpt)) if ckpt else None)

    train_trial(setup, params, tune.get_context().get_trial_id(), 0, 1, tune.get_checkpoint(), report)


def run_trial_on_workers(params: dict, setup: dict) -> None:
    """A Tune function trainable that trains the trial on setup['workers'] Ray Train workers (DeepSpeed)."""
    from ray import train, tune
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    gpus = setup["gpus_per_worker"]
    trainer = TorchTrainer(
        worker_loop, train_loop_config={"params": params, "setup": setup, "trial_id": trial_id},
        scaling_config=train.ScalingConfig(num_workers=setup["workers"], use_gpu=gpus > 0,
                                           resources_per_worker={"CPU": setup["cpus_per_worker"], "GPU": gpus}),
        torch_config=TorchConfig(timeout_s=600),
        # Same name and storage on a retry: Ray Train hands the workers the run's last checkpoint.
        run_config=train.RunConfig(name=f"{setup['name']}-{trial_id}", storage_path=setup["storage"],
                                   callbacks=[TuneReportCallback()],
                                   failure_config=train.FailureConfig(max_failures=setup["max_failures"])))
    trainer.fit()


def worker_loop(config: dict) -> None:
    import ray.train

    setup = config["setup"]
    env = common.ray_rank_setup("deepspeed")

    def report(metrics, ckpt):
        ckpt = ray.train.Checkpoint.from_directory(str(ckpt)) if ckpt and env.rank == 0 else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"step-{metrics['step']:09d}")

    train_trial(setup, config["params"], config["trial_id"], env.rank, env.world, ray.train.get_checkpoint(), report)


# ---------------------------------------------------------------------------------------------- the sweep

def best_result(results, setup: dict):
    """The trial with the lowest last metric among those that ran the whole budget: an ASHA-stopped trial's
    metric comes from fewer steps and is not comparable (at toy size an early figure can beat every finished
    one). Among all trials that reported when none finished; a NaN/Inf metric ranks last."""
    metric = setup["metric"]

    def value(r) -> float:
        v = r.metrics[metric]
        return v if math.isfinite(v) else math.inf

    reported = [r for r in results if r.error is None and r.metrics and r.metrics.get(metric) is not None]
    finished = [r for r in reported if r.metrics.get("step") == setup["steps"]]
    return min(finished or reported, key=value)


def best_yaml(args, best, setup: dict) -> str:
    """The best trial's config as `ddaebm train` reads it: CONFIG + fixed overrides + its values."""
    from ddaebm.config import load_config, to_yaml

    params = {k: best.config[k] for k in setup["space_keys"]}
    name = f"{Path(setup['config']).stem}-{args.name}-best"
    extra = ["dist.backend=deepspeed"] if setup["workers"] > 1 else []
    cfg = load_config(setup["config"], setup["overrides"] + param_overrides(params) + extra, name=name)
    header = (f"# Best of Ray Tune sweep '{args.name}' ({setup['experiment']}): {setup['metric']} = "
              f"{best.metrics[setup['metric']]:.6g} at step {best.metrics['step']} of {setup['steps']}, trial "
              f"{best.metrics['trial_id']}.\n# Swept values: {json.dumps(params)}\n"
              f"# Train it: ddaebm train THIS_FILE   (SLURM: DDAEBM_CONFIG=THIS_FILE sbatch slurm/<script>.sh)\n")
    return header + to_yaml(cfg)


def summarize(results, setup: dict, complete: bool) -> list[dict]:
    """One row per trial; `early_stopped` (ASHA stopped it before --steps) only means that in a complete sweep."""
    trials = []
    for r in results:
        m = r.metrics or {}
        trials.append({"trial_id": m.get("trial_id") or Path(r.path).name, "config": r.config or {},
                       "step": m.get("step", 0), setup["metric"]: m.get(setup["metric"]),
                       "resumed_from": m.get("resumed_from", 0), "error": str(r.error) if r.error else None,
                       "early_stopped": complete and bool(m) and not m.get("finished") and r.error is None})
    return trials


def build_tuner(args, setup: dict, space: dict):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if setup["workers"] > 1:
        # The trial itself only drives the TorchTrainer, whose workers hold the CPUs/GPUs (Ray refuses 0).
        trainable = tune.with_resources(tune.with_parameters(run_trial_on_workers, setup=setup),
                                        {"cpu": DRIVER_CPU})
    else:
        trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup),
                                        {"cpu": args.cpus_per_worker, "gpu": args.gpus_per_worker})
    path = Path(setup["experiment"])
    if tune.Tuner.can_restore(str(path)):
        common.log(f"resuming the sweep in {path} (Tuner.restore)")
        return tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True), True
    scheduler = ASHAScheduler(time_attr="step", max_t=setup["steps"], grace_period=args.grace * args.report_every,
                              reduction_factor=args.reduction)
    tuner = tune.Tuner(
        trainable, param_space=tune_domains(space),
        tune_config=tune.TuneConfig(metric=setup["metric"], mode="min", scheduler=scheduler, num_samples=args.samples,
                                    search_alg=BasicVariantGenerator(max_concurrent=args.max_concurrent,
                                                                     random_state=args.seed)),
        run_config=tune.RunConfig(name=args.name, storage_path=setup["storage"], verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=args.max_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2)))
    return tuner, False


def fit(tuner):
    """tuner.fit(), and whether it was interrupted. Tune ends a sweep gracefully on SIGINT (or SIGUSR1), saving its
    state, and then puts back the SIGINT handler it found: that is how an interruption shows. SIGTERM (a batch
    scheduler's stop) is turned into SIGINT so that it ends the same way."""
    def _sentinel(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, _sentinel)
    signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(os.getpid(), signal.SIGINT))
    try:
        results = tuner.fit()
        return results, signal.getsignal(signal.SIGINT) is _sentinel
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("config", help="ddaebm config (relative to the cwd or the checkout)")
    p.add_argument("--name", help="experiment name (default sweep-<config name>); the same name resumes")
    p.add_argument("--storage", help="Tune storage path, shared by all nodes (default $DDAEBM_RUN_ROOT/sweeps "
                                     "or <checkout>/runs/sweeps)")
    p.add_argument("--samples", type=int, default=16, help="trials drawn from the space (times each grid point)")
    p.add_argument("--steps", type=int, help="training steps per trial (default CONFIG's train.steps)")
    p.add_argument("--report-every", type=int, help="steps per slice: checkpoint + metric (default steps/8)")
    p.add_argument("--grace", type=int, default=1, help="ASHA grace period in slices")
    p.add_argument("--reduction", type=float, default=2, help="ASHA reduction factor")
    p.add_argument("--metric", choices=("auto",) + METRICS, default="auto",
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
    p.add_argument("--workers", type=int, default=1, help=">1: Ray Train workers per trial, dist.backend=deepspeed")
    p.add_argument("--cpus-per-worker", type=float, default=1)
    p.add_argument("--gpus-per-worker", type=float, default=0)
    p.add_argument("--max-concurrent", type=int, default=0, help="trials at once (default: as resources allow)")
    p.add_argument("--max-failures", type=int, default=1, help="restarts of a trial whose process died")
    p.add_argument("--best-out", help="best config YAML (default <storage>/<name>/best.yaml)")
    p.add_argument("--local", action="store_true", help="start a private Ray here instead of joining the cluster")
    p.add_argument("--num-cpus", type=int, help="--local: CPUs Ray may use (default all)")
    p.add_argument("--crash-once-at", type=int, help=argparse.SUPPRESS)  # tests: SIGKILL one trial once
    args, overrides = p.parse_known_args(argv)
    bad = [a for a in overrides if a.startswith("-") or "=" not in a]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    return args, overrides


def make_setup(args, overrides: list[str]) -> tuple[dict, dict]:
    from ddaebm.config import load_config
    from ddaebm.data.stream import is_toy

    config = common.resolve_config(args.config)
    cfg = load_config(config, overrides)  # bad overrides fail here, before Ray starts
    args.name = args.name or f"sweep-{cfg.name}"
    args.steps = args.steps or cfg.train.steps
    args.report_every = args.report_every or max(1, args.steps // 8)
    metric = args.metric if args.metric != "auto" else ("mmd2" if is_toy(cfg) else "fid")
    if is_toy(cfg) != (metric in ("mmd2", "sliced_w1")) and metric != "l_rec":
        raise ValueError(f"--metric {metric} does not fit {'toy' if is_toy(cfg) else 'image'} data")
    if metric == "fid":
        try:
            import ddaebm.metrics.fid  # noqa: F401
            import ddaebm.metrics.inception  # noqa: F401
        except ImportError as err:
            raise ValueError(f"--metric fid needs ddaebm/metrics/fid.py ({err}); use --metric l_rec") from None
    space = read_space(args.space, args.param, cfg)
    load_config(config, overrides + param_overrides({k: _example(v) for k, v in space.items()}))  # keys exist
    if args.local:
        need = args.workers * args.cpus_per_worker + (DRIVER_CPU if args.workers > 1 else 0)
        have = args.num_cpus or os.cpu_count()
        if need > have:
            raise ValueError(f"one trial needs {need:g} logical CPUs (--workers x --cpus-per-worker), Ray here has "
                             f"{have}: raise --num-cpus (logical) or lower --cpus-per-worker")
    storage = Path(args.storage or common.default_run_root() / "sweeps").resolve()
    setup = {"config": str(config), "overrides": overrides, "steps": args.steps, "report_every": args.report_every,
             "metric": metric, "eval_num": args.eval_num, "final_eval": args.final_eval, "workers": args.workers,
             "cpus_per_worker": args.cpus_per_worker, "gpus_per_worker": args.gpus_per_worker,
             "max_failures": args.max_failures, "storage": str(storage), "name": args.name,
             "experiment": str(storage / args.name), "crash_once_at": args.crash_once_at,
             "space_keys": sorted(space)}
    return setup, space


def _example(spec):
    """One value of a space entry, to check that its key and type fit the config before anything runs."""
    if isinstance(spec, list) and spec and spec[0] in ("uniform", "loguniform"):
        return spec[1]
    return spec[1] if isinstance(spec, list) and len(spec) > 1 else spec


def main(argv=None) -> int:
    from ddaebm.config import ConfigError

    args, overrides = parse_args(argv)
    try:
        setup, space = make_setup(args, overrides)
    except (ConfigError, ValueError) as err:
        print(f"sweep: error: {err}", file=sys.stderr)
        return common.EXIT_USAGE
    t0 = time.time()
    common.start_ray(args.local, args.num_cpus)
    Path(setup["experiment"]).mkdir(parents=True, exist_ok=True)
    tuner, resumed = build_tuner(args, setup, space)
    results, interrupted = fit(tuner)
    trials = summarize(results, setup, not interrupted)
    if interrupted:
        print(f"sweep: interrupted; Tune saved its state in {setup['experiment']}: run the same command again to "
              "resume the sweep", file=sys.stderr)
        return 130
    done = [t for t in trials if t[setup["metric"]] is not None and t["error"] is None]
    if not done:
        print("sweep: error: no trial reported a metric", file=sys.stderr)
        return common.EXIT_FAILED
    best = best_result(results, setup)
    out = Path(args.best_out or Path(setup["experiment"]) / "best.yaml")
    out.write_text(best_yaml(args, best, setup))
    summary = {"name": args.name, "metric": setup["metric"], "steps": setup["steps"], "resumed": resumed,
               "wall_s": round(time.time() - t0, 1), "best": best.metrics["trial_id"], "best_yaml": str(out),
               "trials": trials}
    (Path(setup["experiment"]) / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    for t in sorted(trials, key=lambda t: (t[setup["metric"]] is None, t[setup["metric"]] or 0)):
        flag = "error" if t["error"] else "stopped early" if t["early_stopped"] else "finished"
        print(f"{t['trial_id']}  {setup['metric']} {t[setup['metric']]}  step {t['step']}  {flag}  "
              f"{json.dumps({k: t['config'].get(k) for k in setup['space_keys']})}")
    print(f"best: {best.metrics['trial_id']} {setup['metric']}={best.metrics[setup['metric']]:.6g}; "
          f"config written to {out} ({summary['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
