"""Per-sample seeds: sample i is the same whatever the batching or the rank split (SPEC §7.1 sampler)."""

import torch

from ddaebm.config import DiffusionConfig, ModelConfig
from ddaebm.diffusion.schedule import build_schedule
from ddaebm.networks import build_generator_encoder
from ddaebm.sampling import indexed_noise, sample_indexed, sample_seed


def _generator():
    torch.manual_seed(0)
    g = build_generator_encoder(ModelConfig(hidden=32), with_encoder=False).generator
    return g.eval()  # BatchNorm on running statistics: rows do not interact


def test_sample_seed_depends_on_seed_and_index_only():
    assert sample_seed(3, 7) == sample_seed(3, 7)
    assert len({sample_seed(s, i) for s in range(4) for i in range(100)}) == 400
    a = indexed_noise(1, [4, 9], (2,), 2, 4)
    b = indexed_noise(1, [9], (2,), 2, 4)
    assert all(torch.equal(x[1:], y) for x, y in zip(a, b))


def test_batching_and_rank_split_do_not_change_samples():
    s, g = build_schedule(DiffusionConfig(variance="geometric", beta_min=1e-4, beta_max=0.9999)), _generator()
    whole = sample_indexed(g, s, list(range(10)), 5, (2,), 2)
    parts = torch.cat([sample_indexed(g, s, list(range(lo, lo + 3)), 5, (2,), 2) for lo in (0, 3, 6)]
                      + [sample_indexed(g, s, [9], 5, (2,), 2)])
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(sample_indexed(g, s, list(range(10)), 6, (2,), 2), whole)


def test_without_latent_z_is_zero():
    _, z, _ = indexed_noise(0, [0, 1], (2,), 3, 4, use_latent=False)
    assert torch.count_nonzero(z) == 0
