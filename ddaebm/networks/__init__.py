"""Networks: the energy f_θ, the generator G_φ and the encoder q_ψ, built from the model config.

`model.arch` picks a family (method.md §2-§4, §7.5, §8): 'toy' MLPs on 2-D points; 'ncsnpp' U-Nets on images (the
NCSN++ energy −½‖x − U(x, k)‖², the z-conditioned AdaGN NCSN++ generator, a convolutional encoder; DDPM++ is
the same skeleton with fir=false, progressive_input=none; with `model.image_net: small`, the DCGAN-scale networks
of ddaebm/networks/small.py instead); 'mnist_nice' (the NICE_t energy, an exact density at every k, with MLP
generator and encoder on flat logit pixels).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ddaebm.config import ModelConfig


class GeneratorEncoder(nn.Module):
    """G and E as one module: they are trained together by one optimizer (method.md §5)."""

    def __init__(self, generator: nn.Module, encoder: nn.Module | None):
        super().__init__()
        self.generator = generator
        self.encoder = encoder


def _unet_args(cfg: ModelConfig, num_steps: int) -> dict:
    return dict(image_size=cfg.image_size, channels=cfg.channels, nf=cfg.nf, ch_mult=tuple(cfg.ch_mult),
                num_res_blocks=cfg.num_res_blocks, attn_resolutions=tuple(cfg.attn_resolutions), dropout=cfg.dropout,
                fir=cfg.fir, progressive_input=cfg.progressive_input, num_steps=num_steps)


def _small_args(cfg: ModelConfig, num_steps: int) -> dict:
    return dict(image_size=cfg.image_size, channels=cfg.channels, nf=cfg.nf, ch_mult=tuple(cfg.ch_mult),
                num_res_blocks=cfg.num_res_blocks, num_steps=num_steps)


def build_energy(cfg: ModelConfig, num_steps: int = 4) -> nn.Module:
    """f_θ(x, k) for k ∈ {0..num_steps−1}, a scalar per sample."""
    if cfg.arch == "ncsnpp" and cfg.image_net == "small":
        from ddaebm.networks.small import SmallEnergy

        return SmallEnergy(**_small_args(cfg, num_steps), head=cfg.energy_head)
    if cfg.arch == "toy":
        from ddaebm.networks.toy import ToyEnergy

        return ToyEnergy(cfg.data_dim, cfg.hidden, cfg.t_emb_dim, num_steps, cfg.energy_base_std)
    if cfg.arch == "ncsnpp":
        from ddaebm.networks.ncsnpp import NCSNppEnergy

        return NCSNppEnergy(**_unet_args(cfg, num_steps))
    if cfg.arch == "mnist_nice":
        from ddaebm.networks.mnist import NICEEnergy

        return NICEEnergy(dim=cfg.data_dim, hidden=cfg.nice_hidden, num_hidden=cfg.nice_layers,
                          num_couplings=cfg.nice_couplings, num_steps=num_steps)
    raise ValueError(f"unknown model.arch {cfg.arch!r}")


def _generator(cfg: ModelConfig, num_steps: int, skip: Sequence[float] | None) -> nn.Module:
    if cfg.arch == "toy":
        from ddaebm.networks.toy import ToyGenerator

        return ToyGenerator(cfg.data_dim, cfg.nz, cfg.hidden, cfg.t_emb_dim, cfg.gen_norm, num_steps)
    if cfg.arch == "ncsnpp" and cfg.image_net == "small":
        from ddaebm.networks.small import SmallGenerator

        return SmallGenerator(**_small_args(cfg, num_steps), nz=cfg.nz, z_emb_dim=cfg.z_emb_dim, n_mlp=cfg.n_mlp)
    if cfg.arch == "ncsnpp":
        from ddaebm.networks.ncsnpp import NCSNppGenerator

        return NCSNppGenerator(**_unet_args(cfg, num_steps), nz=cfg.nz, z_emb_dim=cfg.z_emb_dim, n_mlp=cfg.n_mlp)
    from ddaebm.networks.mnist import MLPGenerator

    w = cfg.mlp_width
    return MLPGenerator(dim=cfg.data_dim, nz=cfg.nz, num_steps=num_steps, branch=(w, w), widths=(w, w),
                        skip=skip if cfg.mlp_skip else None)


def _encoder(cfg: ModelConfig, num_steps: int) -> nn.Module:
    if cfg.arch == "toy":
        from ddaebm.networks.toy import ToyEncoder

        return ToyEncoder(cfg.data_dim, cfg.nz, cfg.hidden, cfg.t_emb_dim, cfg.gen_norm, cfg.logvar_min,
                          cfg.logvar_max, num_steps)
    if cfg.arch == "ncsnpp":
        from ddaebm.networks.encoders import ConvEncoder

        return ConvEncoder(cfg.encoder, cfg.image_size, cfg.channels, cfg.nz, ngf=cfg.encoder_ngf,
                           t_emb_dim=cfg.t_emb_dim, num_steps=num_steps, logvar_min=cfg.logvar_min,
                           logvar_max=cfg.logvar_max)
    from ddaebm.networks.mnist import MLPEncoder

    w = cfg.mlp_width
    return MLPEncoder(dim=cfg.data_dim, nz=cfg.nz, num_steps=num_steps, logvar_min=cfg.logvar_min,
                      logvar_max=cfg.logvar_max, branch=(2 * w, w), widths=(w,))


def build_generator_encoder(cfg: ModelConfig, with_encoder: bool = True, num_steps: int = 4,
                            skip_gains: Sequence[float] | None = None) -> GeneratorEncoder:
    """`skip_gains`: the initial gains g_k of `model.mlp_skip` (Model passes √ᾱ_{k+1}); default 1."""
    if cfg.arch not in ("toy", "ncsnpp", "mnist_nice"):
        raise ValueError(f"unknown model.arch {cfg.arch!r}")
    skip = [1.0] * num_steps if skip_gains is None else skip_gains
    return GeneratorEncoder(_generator(cfg, num_steps, skip), _encoder(cfg, num_steps) if with_encoder else None)


def parameter_counts(energy: nn.Module, gen_enc: GeneratorEncoder) -> dict[str, int]:
    """Trainable parameters per network, for the start-of-run summary and the README table."""
    count = lambda m: sum(p.numel() for p in m.parameters()) if m is not None else 0  # noqa: E731
    return {"energy": count(energy), "generator": count(gen_enc.generator), "encoder": count(gen_enc.encoder)}
