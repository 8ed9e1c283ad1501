"""Networks: the energy f_θ, the generator G_φ and the encoder q_ψ, built from the model config."""

from __future__ import annotations

from torch import nn

from ddaebm.config import ModelConfig
from ddaebm.networks.toy import ToyEncoder, ToyEnergy, ToyGenerator


class GeneratorEncoder(nn.Module):
    """G and E as one module: they are trained together by one optimizer (SPEC §5)."""

    def __init__(self, generator: nn.Module, encoder: nn.Module | None):
        super().__init__()
        self.generator = generator
        self.encoder = encoder


def build_energy(cfg: ModelConfig, num_steps: int = 4) -> nn.Module:
    """f_θ(x, k) for k ∈ {0..num_steps−1}."""
    if cfg.arch == "toy":
        return ToyEnergy(cfg.data_dim, cfg.hidden, cfg.t_emb_dim, num_steps)
    raise ValueError(f"unknown model.arch {cfg.arch!r}")


def build_generator_encoder(cfg: ModelConfig, with_encoder: bool = True, num_steps: int = 4) -> GeneratorEncoder:
    if cfg.arch == "toy":
        gen = ToyGenerator(cfg.data_dim, cfg.nz, cfg.hidden, cfg.t_emb_dim, cfg.gen_norm, num_steps)
        enc = ToyEncoder(cfg.data_dim, cfg.nz, cfg.hidden, cfg.t_emb_dim, cfg.gen_norm, cfg.logvar_min,
                         cfg.logvar_max, num_steps) if with_encoder else None
        return GeneratorEncoder(gen, enc)
    raise ValueError(f"unknown model.arch {cfg.arch!r}")
