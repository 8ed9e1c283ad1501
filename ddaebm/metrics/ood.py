"""Out-of-distribution detection with the energy (method.md §7.4): f_θ(x, k=0) scores, AUROC between shard sets.

As VAEBM: in-distribution samples are the positives, the score is the energy (higher = more in-distribution), and
AUROC is the probability that a random in-distribution sample scores above a random OOD one, ties counting ½.
That is the Mann-Whitney U statistic divided by n_in·n_ood, computed here from average ranks of the pooled scores
(the same value as sklearn.metrics.roc_auc_score on labels 1/0, tested in tests/test_ood.py).

All sets are read by `iterate_split` with the model's resolution (resize of the shorter side + centre crop),
channel count (decoded to L or RGB) and preprocessing (for NICE, the logit path with noise seeded by --seed), in
stored order; `num` keeps the first samples of a split.
"""

from __future__ import annotations

import numpy as np
import torch

from ddaebm.errors import BadValue


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x, tied values sharing the mean of their ranks."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Boundaries of runs of equal values in sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    mean_rank = (starts + 1 + ends) / 2.0  # mean of the ranks starts+1 .. ends
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def auroc(positive, negative) -> float:
    """P(score(pos) > score(neg)) + ½ P(tie): Mann-Whitney U / (n_pos·n_neg), from average ranks."""
    pos, neg = np.asarray(positive, np.float64).ravel(), np.asarray(negative, np.float64).ravel()
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(f"AUROC needs both sets non-empty, got {len(pos)} and {len(neg)} scores")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise ValueError("AUROC: non-finite energies (the model diverged?)")
    ranks = average_ranks(np.concatenate([pos, neg]))
    u = ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


def parse_set(spec: str) -> tuple[str, str, str]:
    """'ROOT:NAME:SPLIT' → (root, name, split); ROOT may itself contain ':'."""
    parts = spec.rsplit(":", 2)
    if len(parts) != 3 or not all(parts):
        raise BadValue(f"shard set {spec!r}: expected ROOT:NAME:SPLIT (e.g. data/svhn:svhn:test)")
    return parts[0], parts[1], parts[2]


@torch.no_grad()
def energy_scores(energy: torch.nn.Module, batches, device, num: int | None = None) -> np.ndarray:
    """f_θ(x, 0) in float64 for the images of `batches` ((images, labels) pairs), the first `num` of them."""
    out, seen = [], 0
    for images, _ in batches:
        if num is not None and seen >= num:
            break
        x = images[: None if num is None else num - seen].to(device)
        k = torch.zeros(len(x), dtype=torch.long, device=device)
        out.append(energy(x, k).double().cpu().numpy())
        seen += len(x)
    if hasattr(batches, "close"):
        batches.close()
    return np.concatenate(out) if out else np.zeros(0)


def set_scores(energy, cfg, spec: str, batch: int, num: int | None, seed: int, device) -> np.ndarray:
    """The energies of the shard set `spec` (ROOT:NAME:SPLIT), read as the model's training data is."""
    from ddaebm.data.images import iterate_split
    from ddaebm.data.stream import resolution

    root, name, split = parse_set(spec)
    batches = iterate_split(root, name, split, batch, resolution(cfg), cfg.model.channels, cfg.data.preprocess,
                            cfg.data.loader, cfg.data.workers, cfg.data.on_error, seed=seed)
    return energy_scores(energy, batches, device, num)


def open_check(spec: str) -> None:
    """Fails early (FileNotFoundError / ValueError) when the shard set `spec` is missing or malformed."""
    from ddaebm.data.shards import ShardSet

    ShardSet(*parse_set(spec)).close()
