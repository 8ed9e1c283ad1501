"""A short real training run: the toy model learns the 25 modes and its energy concentrates on the data.

method.md §13 asks for this smoke test: a few thousand iterations on CPU with T = 4 and a schedule that ends at noise.
"""

import numpy as np
import torch

from ddaebm.config import load_config
from ddaebm.data.toy import sample_toy, toy_modes
from ddaebm.metrics.toy import mode_stats
from ddaebm.training.loop import train
from tests.conftest import CONFIGS


def test_toy_training_finds_the_modes(tmp_path):
    cfg = load_config(CONFIGS / "toy" / "25gaussians.yaml", [
        "train.steps=4000", "train.log_every=1000", "train.ckpt_every=4000", "train.snapshot_every=100000",
        "train.eval_at_end=false"])
    centres, std = toy_modes("25gaussians")
    trainer = train(cfg, tmp_path / "run")
    # Measured on this configuration: 22-23 of 25 modes, 0.25 within 3σ, an energy gap of ~26 nats; an untrained
    # generator puts everything on one or two modes. The bounds leave room for another CPU's arithmetic.
    end = mode_stats(trainer.model.generate(2500, seed=1).numpy(), centres.numpy(), std)
    assert end["modes_covered"] >= 18 and end["frac_within_3sigma"] > 0.15, end
    # The energy at k = 0 ranks data above uniform points of the plot's square.
    data = sample_toy("25gaussians", 2000, torch.Generator().manual_seed(2))
    uniform = torch.rand(2000, 2, generator=torch.Generator().manual_seed(3)) * 8 - 4
    k0 = torch.zeros(2000, dtype=torch.long)
    with torch.no_grad():
        gap = (trainer.energy(data, k0) - trainer.energy(uniform, k0)).mean().item()
    assert np.isfinite(gap) and gap > 5.0, gap
