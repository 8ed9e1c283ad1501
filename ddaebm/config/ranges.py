"""The value range of every number in the schema (ddaebm/config/schema.py), in one table beside it.

`RANGES` names each int and float field (and each list of numbers, whose entries it bounds) with the values it
admits; `ddaebm.config._check_values` applies it, with the string choices and the relations between fields, in
one place after every merge, so a value out of range is refused with its key before anything runs or is
written. Floats must also be finite and within float32's range (they become float32 tensors). Upper bounds stand
where a larger value cannot be meant and would fail deep inside (an allocation, an integer overflow, a timer)
rather than at the key; they are not tuning advice. tests/test_config.py fails on a numeric schema field without
an entry here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


FLOAT32_MAX = 3.4028234663852886e38  # the networks, losses and schedules hold these values as float32 tensors


@dataclass(frozen=True)
class Range:
    """lo ≤ v ≤ hi (an open end excludes its bound), a multiple of `step` when given; None: unbounded."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    step: int | None = None

    def admits(self, v) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if isinstance(v, float) and not (math.isfinite(v) and abs(v) <= FLOAT32_MAX):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        if self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi):
            return False
        return self.step is None or v % self.step == 0

    def describe(self) -> str:
        lo, hi = _shown(self.lo), _shown(self.hi)
        if self.lo is not None and self.hi is not None:
            text = f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            text = f"{'>' if self.lo_open else '≥'} {lo}"
        elif self.hi is not None:
            text = f"{'<' if self.hi_open else '≤'} {hi}"
        else:
            text = "finite"
        return text + (f" and a multiple of {self.step}" if self.step else "")


def _shown(v: float | None) -> str:
    return str(int(v)) if v is not None and float(v).is_integer() else f"{v:g}" if v is not None else ""


def at_least(lo: float, hi: float | None = None, step: int | None = None) -> Range:
    return Range(lo, hi, step=step)


def positive(hi: float | None = None) -> Range:
    return Range(0, hi, lo_open=True)


def fraction() -> Range:
    """[0, 1): a decay, a momentum, a dropout rate."""
    return Range(0, 1, hi_open=True)


ANY = Range()  # any finite number
SIZE = at_least(1, 1 << 20)  # a width, a count of layers or samples: ≥ 1, and nothing that cannot be allocated
INTERVAL = at_least(1)  # every N steps
SEED = at_least(0, (1 << 31) - 1)  # seeds are multiplied by constants up to ~1e6 and must stay in 64 bits

RANGES: dict[str, Range] = {
    # diffusion
    "diffusion.num_steps": at_least(1, 1000),
    "diffusion.beta_min": at_least(0),
    "diffusion.beta_max": positive(),
    "diffusion.eps": Range(0, 1, lo_open=True, hi_open=True),
    "diffusion.variances": Range(0, 1, lo_open=True, hi_open=True),
    "diffusion.clamp_beta": Range(0, 1, lo_open=True),
    "diffusion.posterior_logvar_floor": at_least(0),
    # model
    "model.data_dim": SIZE,
    "model.nz": at_least(1, 1 << 16),
    "model.hidden": at_least(1, 1 << 16),
    "model.t_emb_dim": at_least(4, 1 << 16, step=2),  # sin and cos halves, each at least 2 frequencies
    "model.energy_base_std": at_least(0),
    "model.logvar_min": ANY,
    "model.logvar_max": ANY,
    "model.image_size": at_least(1, 1 << 14),
    "model.channels": at_least(1, 1 << 10),
    "model.nf": at_least(4, 1 << 14),
    "model.ch_mult": at_least(1, 1 << 10),
    "model.num_res_blocks": at_least(1, 1 << 10),
    "model.attn_resolutions": at_least(1, 1 << 14),
    "model.dropout": fraction(),
    "model.z_emb_dim": at_least(1, 1 << 16),
    "model.n_mlp": at_least(0, 1 << 10),
    "model.encoder_ngf": at_least(1, 1 << 14),
    "model.nice_hidden": at_least(1, 1 << 16),
    "model.nice_layers": at_least(1, 1 << 10),
    "model.nice_couplings": at_least(1, 1 << 10),
    "model.mlp_width": at_least(1, 1 << 16),
    # loss
    "loss.lambda_ent": at_least(0),
    "loss.lambda_rec": at_least(0),
    "loss.lambda_kl": at_least(0),
    "loss.iw_alpha": positive(),
    "loss.iw_beta": positive(),
    "loss.recon_var_floor": at_least(0),
    "loss.r1_gamma": at_least(0),
    "loss.r1_gamma_scale": at_least(0),
    "loss.step_probs": at_least(0),
    "loss.r1_interval": INTERVAL,
    "loss.fake_weight": at_least(0),
    "loss.nce_weight": at_least(0),
    "loss.nce_std": positive(),
    # optim
    "optim.lr_g": positive(),
    "optim.lr_d": positive(),
    "optim.beta1": fraction(),
    "optim.beta2": fraction(),
    "optim.adam_eps": positive(),
    "optim.lr_min": at_least(0),
    "optim.ema_decay": fraction(),
    # data
    "data.batch": SIZE,
    "data.resolution": at_least(0, 1 << 14),
    "data.workers": at_least(0, 1024),
    # train
    "train.steps": at_least(1, 1 << 40),
    "train.seed": SEED,
    "train.threads": at_least(0, 1024),
    "train.log_every": INTERVAL,
    "train.snapshot_every": INTERVAL,
    "train.ckpt_every": INTERVAL,
    "train.keep_ckpts": at_least(0),
    "train.max_nonfinite": at_least(0),
    # dist
    "dist.zero_stage": at_least(0, 2),
    "dist.grad_clip": at_least(0),
    "dist.timeout_s": at_least(1, 7 * 86400),
    "dist.resume_timeout_s": at_least(1, 7 * 86400),
    # sample, eval
    "sample.refine_step": at_least(0),
    "sample.precise_bn_batches": at_least(0, 1 << 20),
    "eval.num_samples": at_least(2, 1 << 24),
    "eval.grid": at_least(2, 1 << 14),
    "eval.range_lo": ANY,
    "eval.range_hi": ANY,
}
