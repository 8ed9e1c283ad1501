"""The toy fast path: the same training objectives as ddaebm/losses.py for the 2-D MLPs, in hand-written passes.

An option (`train.fast_path`: auto | generic), decided once where the trainer builds its phases: `select(cfg)`
returns the Objectives to train with, the fast ones only for configs whose every switch they implement, and
otherwise the generic (autograd) ones with the reason. Nothing else in the package reaches into this one.

    layout.py      which module structures the passes were written for, and their flat tensor "specs"
    passes.py      the MLPs' and the energy's forward and backward passes, as single autograd nodes
    objectives.py  the energy step (R1 in closed form), lazy R1 and the generator+encoder step from them
    cpu.py         the one machine-specific choice: the kernel of the hidden products (train.fast_products)

Every field of the loss, model and diffusion config is listed below, either as implemented (HANDLED) or as a
value the fast path requires (REQUIRES: any other value makes it decline). tests/test_fastpath_select.py fails
on a field in neither, so a term added to the losses cannot be dropped silently on toy runs.
"""

from __future__ import annotations

from ddaebm.config import Config
from ddaebm.losses import GENERIC, Objectives

# Fields the fast path implements for every value (read by its passes or objectives, consumed by the schedule or
# the StepBatch draw that both paths share, or not read by the toy networks at all).
HANDLED = {
    "diffusion": {"num_steps", "beta_min", "beta_max", "grid", "eps", "variance", "variances", "first_beta",
                  "clamp_beta", "posterior_logvar_floor"},
    "loss": {"lambda_ent", "lambda_rec", "lambda_kl", "iw_alpha", "iw_beta", "recon_var_floor",
             "recon_var_floor_step1", "r1_gamma", "r1_gamma_scale", "step_probs", "r1_target", "r1_interval",
             "r1_precision",  # the fast path runs in fp32 only
             "fake_weight", "nce_weight", "nce_std"},
    "model": {"data_dim", "nz", "hidden", "t_emb_dim", "gen_norm", "energy_base_std", "logvar_min", "logvar_max",
              "sample_bn_mode",  # sampling only
              # the image and NICE networks' fields: not read by arch=toy
              "image_size", "channels", "nf", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "fir",
              "progressive_input", "z_emb_dim", "n_mlp", "encoder", "encoder_ngf", "channels_last", "nice_hidden",
              "nice_layers", "nice_couplings", "mlp_width", "mlp_skip", "image_net", "energy_head"},
}

# Fields whose other values the fast path does not implement: key -> the values it requires.
REQUIRES = {
    "model.arch": ("toy",),
    "loss.ablation": ("full",),  # the generator objective is written for every term on
    "loss.recon_mode": ("elbo_encoder",),
    "dist.precision": ("fp32",),  # the passes run in the parameters' dtype, without autocast
    "train.fast_path": ("auto",),
}


def _value(cfg: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def declined(cfg: Config) -> str | None:
    """Why the fast path does not apply to `cfg` (the first key whose value it lacks), or None."""
    for key, allowed in REQUIRES.items():
        if _value(cfg, key) not in allowed:
            return f"{key}={_value(cfg, key)}"
    return None


def select(cfg: Config) -> tuple[Objectives, str]:
    """(the objectives to train with, a few words on why), configuring the CPU kernel when the fast path wins."""
    reason = declined(cfg)
    if reason is not None:
        return GENERIC, f"generic autograd ({reason})"
    from ddaebm.fastpath import cpu, objectives

    cpu.configure(cfg.train.fast_products)
    fast = Objectives("toy fast path", generator_forward=objectives.generator_forward,
                      energy_loss=objectives.energy_loss, lazy_r1_loss=objectives.lazy_r1_loss,
                      generator_loss=objectives.generator_loss)
    kernel = "oneDNN" if cpu.uses_onednn() else "ATen"
    return fast, f"toy fast path (hidden products: {kernel})"
