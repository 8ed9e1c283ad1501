"""`ddaebm eval toy|fid|is|ood|modes|nll RUN_DIR [...]`: the metrics of a trained run (method.md §7.4, §7.5, §10).

Each command appends one JSON row to `RUN_DIR/metric-<name>.jsonl` (step, sample count, seed, settings, seconds)
and prints it as a table. Bad input (no checkpoint, a missing shard set, a toy run for an image metric, a model
that is not NICE for `nll`) ends in one `ddaebm: error: ...` line, exit status 2, and no row.

    ddaebm eval toy   RUN [--num N] [--grid N] [--range LO HI] [--seed S]
    ddaebm eval fid   RUN [--num 50000] [--ref ROOT:NAME:SPLIT] [--ref-num N] [--cache DIR] [--inception PATH]
    ddaebm eval is    RUN --inception-logits PATH [--num 50000] [--splits 10]
    ddaebm eval ood   RUN --ood ROOT:NAME:SPLIT [--ood ...] [--in ROOT:NAME:SPLIT] [--num N]
    ddaebm eval modes RUN --mnist ROOT:NAME [--num 26000] [--data ROOT:NAME:SPLIT] [--p data|uniform]
    ddaebm eval nll   RUN [--data ROOT:NAME:SPLIT] [--num N] [--exact-num 64]

fid, is and modes run on every rank of a launcher (torchrun/srun: --num-samples spells --num there): each rank
generates its block of sample indices with per-sample seeds and one all-reduce combines the additive sums
(ddaebm/metrics/fid.py); rank 0 writes the row. toy, ood and nll run in one process.
Each command opens the run's model (ddaebm/model.py) and appends its row through ddaebm/evaluation/rows.py.
Defaults: the reference (fid) and the StackedMNIST labels (modes) are the run's training shards
(data.root:data.dataset:data.split); the in-distribution set (ood) and the NICE test data (nll) are its `test`
split.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from ddaebm.errors import BadInput
from ddaebm.evaluation.rows import finish, print_table
from ddaebm.model import Model

EXIT_USAGE, EXIT_FAILED = 2, 1


# ---------------------------------------------------------------------------------------------- shared


def open_run(run_dir_arg: str, metric: str, image: bool = True,
             refine_step: float | None = None) -> tuple[Path, Model]:
    """(run dir, its model refining with `refine_step` if given) for `eval <metric>`; an image metric refuses a toy
    run and vice versa."""
    from ddaebm.data.stream import is_toy

    run_dir = Path(run_dir_arg)
    if not run_dir.is_dir():
        raise BadInput(f"run dir {run_dir_arg} does not exist")
    model = Model.from_run(run_dir)
    model.set_refine_step(refine_step)
    if image and is_toy(model.cfg):
        raise BadInput(f"eval {metric} needs an image model; {run_dir} is a toy run "
                       f"(data.dataset={model.cfg.data.dataset}): use `ddaebm eval toy`")
    if not image and not is_toy(model.cfg):
        raise BadInput(f"eval {metric} needs a toy model; {run_dir} trains on data.dataset={model.cfg.data.dataset}")
    return run_dir, model


def _default_set(cfg, split: str | None = None) -> str:
    if not cfg.data.root:
        raise BadInput("the run has no data.root: name the shard set explicitly (ROOT:NAME:SPLIT)")
    return f"{cfg.data.root}:{cfg.data.dataset}:{split or cfg.data.split}"


def _use_ema(args) -> bool | None:
    return False if args.raw else None


def _sampling(model: Model, args) -> dict:
    """How the samples were drawn, for the rows: `refine` the refinement step size (None: unrefined), `use_ema`
    whether `generate` used the EMA generator (sample.use_ema unless --raw, and an EMA is kept)."""
    return {"refine": model.cfg.sample.refine_step if args.refine else None,
            "use_ema": bool(model.cfg.sample.use_ema and not args.raw and model.averaged is not None)}


def _one_process(metric: str) -> None:
    from ddaebm import distributed

    if distributed.discover().world > 1:
        raise BadInput(f"eval {metric} reads data only and runs in one process: start it without torchrun/srun")


def _check_num(num: int, minimum: int, batch: int, what: str = "--num") -> None:
    from ddaebm import distributed

    world = distributed.discover().world
    if batch < 1:
        raise BadInput(f"--batch {batch}: need at least 1")
    if num < max(minimum, world):
        raise BadInput(f"{what} {num}: need at least {max(minimum, world)} (and one sample per rank)")


def ranked(body):
    """Run `body(args)` on this process, or under a launcher inside a process group (gloo/NCCL) that every exit
    leaves through distributed.shutdown/abort, as `ddaebm train` does."""

    def run(args) -> int:
        from ddaebm import distributed
        env = distributed.discover()
        if env.world == 1:
            return body(args)
        distributed.init(env, "torch", args.timeout)
        try:
            code = body(args)
        except BadInput as err:
            print(f"ddaebm: error: {err}", file=sys.stderr)
            distributed.abort(EXIT_USAGE)
        except BaseException:  # noqa: BLE001 - a dead peer or a timeout: leave now
            import traceback

            traceback.print_exc()
            print(f"ddaebm: error: rank {env.rank}/{env.world} failed", file=sys.stderr)
            distributed.abort(EXIT_FAILED)
        distributed.shutdown(code)

    return run


def _is_lead() -> bool:
    from ddaebm import distributed

    return distributed.discover().lead


# ---------------------------------------------------------------------------------------------- toy


def eval_toy(args) -> int:
    from ddaebm.evaluation.toy import evaluate_toy

    t0 = time.perf_counter()
    if args.num is not None and args.num < 2:
        raise BadInput(f"--num {args.num}: need at least 2 samples")
    if args.grid is not None and args.grid < 2:
        raise BadInput(f"--grid {args.grid}: need at least 2 points per side")
    lo, hi = args.range if args.range else (None, None)
    if args.range and not lo < hi:
        raise BadInput(f"--range {lo} {hi}: need LO < HI")
    run_dir, model = open_run(args.run_dir, "toy", image=False)
    row = evaluate_toy(model, run_dir, args.num, args.grid, lo, hi, args.seed)
    print_table(f"toy of {run_dir} (step {row['step']}) -> {run_dir / 'metric-toy.jsonl'} "
                f"({time.perf_counter() - t0:.1f} s)", row)
    return 0


# ---------------------------------------------------------------------------------------------- fid / is


def eval_fid(args) -> int:
    from ddaebm import distributed
    from ddaebm.data.stream import resolution
    from ddaebm.metrics.fid import fid_of_model, reference_stats
    from ddaebm.metrics.inception import FeatureExtractor
    from ddaebm.metrics.ood import parse_set

    t0 = time.perf_counter()
    _check_num(args.num, 2, args.batch)
    run_dir, model = open_run(args.run_dir, "fid", refine_step=args.refine_step)
    cfg = model.cfg
    ref = args.ref or _default_set(cfg)
    root, name, split = parse_set(ref)
    extractor = FeatureExtractor(args.inception, model.device, args.inception_batch)
    stats, cache_file, cached = reference_stats(root, name, split, resolution(cfg), cfg.model.channels, extractor,
                                                args.ref_num, Path(args.cache) if args.cache else None, args.batch,
                                                cfg.data.loader, cfg.data.workers)
    fid = fid_of_model(model, stats, args.num, args.batch, args.seed, extractor, args.refine, _use_ema(args))
    if _is_lead():
        row = {"metric": "fid", "step": model.step, "fid": fid, "num_samples": args.num, "seed": args.seed,
               "ref": ref, "ref_num": stats.num, "ref_cache": str(cache_file), "ref_cached": cached,
               "extractor": extractor.id, **_sampling(model, args),
               "world": distributed.world_size()}
        finish(run_dir, "fid", row, t0)
    return 0


def eval_is(args) -> int:
    from ddaebm import distributed
    from ddaebm.metrics.fid import eval_mode, generated_images, sum_over_ranks
    from ddaebm.metrics.inception import ISAccumulator, LogitsModel

    t0 = time.perf_counter()
    _check_num(args.num, max(args.splits, 1), args.batch)
    run_dir, model = open_run(args.run_dir, "is", refine_step=args.refine_step)
    logits_model = LogitsModel(args.inception_logits, model.device, args.inception_batch)
    acc = None
    with eval_mode(model):
        for idx, images in generated_images(model, args.num, args.seed, args.batch, args.refine, _use_ema(args)):
            probs = logits_model(images)
            acc = acc or ISAccumulator(args.num, args.splits, probs.shape[1])
            acc.add(probs, idx)
    acc.count, acc.p_sum, acc.neg_entropy = sum_over_ranks(acc.arrays())
    mean, std = acc.score()
    if _is_lead():
        row = {"metric": "is", "step": model.step, "is": mean, "is_std": std, "splits": args.splits,
               "num_samples": args.num, "seed": args.seed, "classes": acc.p_sum.shape[1], "model": logits_model.id,
               **_sampling(model, args),
               "world": distributed.world_size()}
        finish(run_dir, "is", row, t0)
    return 0


# ---------------------------------------------------------------------------------------------- ood


def eval_ood(args) -> int:
    from ddaebm.metrics.fid import eval_mode
    from ddaebm.metrics.ood import auroc, open_check, parse_set, set_scores

    t0 = time.perf_counter()
    _one_process("ood")
    if args.num is not None and args.num < 1:
        raise BadInput(f"--num {args.num}: need at least 1")
    run_dir, model = open_run(args.run_dir, "ood")
    cfg = model.cfg
    in_spec = args.in_set or _default_set(cfg, "test")
    for spec in (in_spec, *args.ood):
        open_check(spec)
    use_ema = cfg.eval.energy_ema and not args.raw
    _, energy = model.sampling_networks(use_ema)
    with eval_mode(model):
        s_in = set_scores(energy, cfg, in_spec, args.batch, args.num, args.seed, model.device)
        ood = {}
        for spec in args.ood:
            s = set_scores(energy, cfg, spec, args.batch, args.num, args.seed, model.device)
            label = ":".join(parse_set(spec)[1:])
            ood[label if label not in ood else spec] = {"auroc": auroc(s_in, s), "num": len(s),
                                                        "mean_f": float(s.mean())}
    row = {"metric": "ood", "step": model.step, "in": in_spec, "num_in": len(s_in), "mean_f_in": float(s_in.mean()),
           "ood": ood, "seed": args.seed, "energy_ema": bool(use_ema and model.averaged is not None)}
    finish(run_dir, "ood", row, t0)
    return 0


# ---------------------------------------------------------------------------------------------- modes


def _p_data(cfg, args) -> tuple[np.ndarray, str]:
    from ddaebm.data.images import load_labels
    from ddaebm.metrics.ood import parse_set
    from ddaebm.metrics.stackedmnist import NUM_MODES, label_distribution

    if args.p == "uniform":
        return np.full(NUM_MODES, 1.0 / NUM_MODES), "uniform"
    spec = args.data or _default_set(cfg)
    return label_distribution(load_labels(*parse_set(spec))), spec


def eval_modes(args) -> int:
    from ddaebm import distributed
    from ddaebm.metrics.fid import eval_mode, generated_images, sum_over_ranks
    from ddaebm.metrics.stackedmnist import classifier_for, label_counts, modes_row, stacked_labels

    t0 = time.perf_counter()
    _check_num(args.num, 1, args.batch)
    run_dir, model = open_run(args.run_dir, "modes", refine_step=args.refine_step)
    cfg = model.cfg
    if cfg.model.channels != 3:
        raise BadInput(f"eval modes needs a 3-channel StackedMNIST model; {run_dir} has model.channels="
                          f"{cfg.model.channels}")
    parts = args.mnist.rsplit(":", 1)
    if len(parts) != 2 or not all(parts):
        raise BadInput(f"--mnist {args.mnist!r}: expected ROOT:NAME (the splits train and test are used)")
    p_data, p_source = _p_data(cfg, args)
    cache = Path(args.classifier_cache) if args.classifier_cache else None
    train = dict(epochs=args.classifier_epochs, seed=args.classifier_seed, cache_dir=cache, loader=cfg.data.loader,
                 workers=cfg.data.workers)
    if _is_lead():  # rank 0 trains (or loads) and caches; the others then load its file
        classifier, info = classifier_for(*parts, **train)
    distributed.barrier()
    if not _is_lead():
        classifier, info = classifier_for(*parts, **train)
    classifier = classifier.to(model.device)
    counts = np.zeros(len(p_data))
    with eval_mode(model):
        for _, images in generated_images(model, args.num, args.seed, args.batch, args.refine, _use_ema(args)):
            counts += label_counts(stacked_labels(classifier, images))
    (counts,) = sum_over_ranks([counts])
    if _is_lead():
        row = {"metric": "modes", "step": model.step, **modes_row(counts, p_data), "num_samples": args.num,
               "seed": args.seed, "p": p_source, "classifier_test_accuracy": info["test_accuracy"],
               "classifier": info["path"], **_sampling(model, args), "world": distributed.world_size()}
        if row["kl"] is None:
            row["kl_note"] = "infinite: samples hit labels the data set lacks (small data set? try --p uniform)"
        finish(run_dir, "modes", row, t0)
    return 0


# ---------------------------------------------------------------------------------------------- nll


def eval_nll(args) -> int:
    from ddaebm.data.images import iterate_split
    from ddaebm.data.pixels import save_grid, to_uint8
    from ddaebm.data.stream import resolution
    from ddaebm.metrics.fid import eval_mode
    from ddaebm.metrics.nice import exact_samples, is_nice, log_likelihoods, summarize
    from ddaebm.metrics.ood import parse_set

    t0 = time.perf_counter()
    _one_process("nll")
    if (args.num is not None and args.num < 1) or args.exact_num < 1:
        raise BadInput(f"--num and --exact-num must be ≥ 1, got {args.num} and {args.exact_num}")
    run_dir, model = open_run(args.run_dir, "nll")
    cfg = model.cfg
    use_ema = cfg.eval.energy_ema and not args.raw
    _, energy = model.sampling_networks(use_ema)
    if not is_nice(energy) or cfg.data.preprocess != "logit":
        raise BadInput(f"eval nll needs the NICE energy on logit data (model.arch=mnist_nice); {run_dir} has "
                          f"model.arch={cfg.model.arch}, data.preprocess={cfg.data.preprocess}")
    spec = args.data or _default_set(cfg, "test")
    batches = iterate_split(*parse_set(spec), args.batch, resolution(cfg), cfg.model.channels, "logit",
                            cfg.data.loader, cfg.data.workers, cfg.data.on_error, seed=args.seed)
    with eval_mode(model):
        f, jac = log_likelihoods(energy, batches, model.device, args.num)
        exact = exact_samples(energy, args.exact_num, args.seed)
    save_grid(run_dir / "exact.png", to_uint8(exact, "logit"))
    row = {"metric": "nll", "step": model.step, **summarize(f, jac, energy.dim), "num": len(f), "data": spec,
           "seed": args.seed, "energy_ema": bool(use_ema and model.averaged is not None),
           "exact_png": str(run_dir / "exact.png")}
    finish(run_dir, "nll", row, t0)
    return 0
