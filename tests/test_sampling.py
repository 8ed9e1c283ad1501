"""Sampling (method.md §7.1): per-sample seeds (sample i is the same whatever the batching or the rank split), and
precise BN (the generator's BatchNorm statistics recomputed before sampling, sample.precise_bn_batches)."""

import pytest
import torch

from ddaebm.config import DiffusionConfig, ModelConfig
from ddaebm.diffusion.schedule import build_schedule
from ddaebm.networks import build_generator_encoder
from ddaebm.sampling import batch_norms, indexed_noise, precise_bn, sample_indexed, sample_seed


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


# ---- precise BN (sample.precise_bn_batches)


class _LinearBN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.bn = torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.lin(x))


def test_precise_bn_is_the_plain_average_of_batch_statistics_on_a_copy():
    torch.manual_seed(0)
    net = _LinearBN().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    batches = [(torch.randn(16, 3) * (i + 1) + i,) for i in range(5)]
    out = precise_bn(net, batches)
    with torch.no_grad():
        h = [net.lin(x) for (x,) in batches]
    torch.testing.assert_close(out.bn.running_mean, torch.stack([a.mean(0) for a in h]).mean(0))
    torch.testing.assert_close(out.bn.running_var, torch.stack([a.var(0) for a in h]).mean(0))  # unbiased
    assert out is not net and out.bn.momentum == net.bn.momentum and not out.training
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # the original is untouched
    torch.testing.assert_close(out.lin.weight, net.lin.weight)


def test_precise_bn_without_batch_norm_or_batches():
    lin = torch.nn.Linear(2, 2)
    assert precise_bn(lin, iter(())) is lin  # nothing to recompute, nothing drawn
    with pytest.raises(ValueError, match="no batches"):
        precise_bn(_LinearBN(), [])


def _toy_trainer(*overrides):
    from ddaebm.config import load_config
    from ddaebm.training.trainer import Trainer
    from tests.conftest import CONFIGS, TINY

    t = Trainer(load_config(CONFIGS / "toy" / "25gaussians.yaml", [*TINY, *overrides]))
    for _ in range(3):
        t.train_step()
    return t


def test_sampling_generator_recomputes_statistics_reproducibly_and_leaves_training_alone():
    t = _toy_trainer("sample.precise_bn_batches=4")
    stream, rng = t.stream.state_dict()["rng"].clone(), t.rng.get_state().clone()
    a = t.model.sampling_generator(True)
    assert t.model.sampling_generator(True) is a  # kept while the EMA generator is unchanged
    t.model._precise_bn = None
    b = t.model.sampling_generator(True)  # recomputed: the same statistics
    ema = t.ema.shadow["generator"].generator
    assert a is not ema and b is not a
    for x, y, z in zip(batch_norms(a), batch_norms(b), batch_norms(ema)):
        assert torch.equal(x.running_mean, y.running_mean) and torch.equal(x.running_var, y.running_var)
        assert not torch.equal(x.running_mean, z.running_mean)
    assert torch.equal(t.stream.state_dict()["rng"], stream) and torch.equal(t.rng.get_state(), rng)

    assert torch.equal(t.model.generate(64, seed=3), t.model.generate(64, seed=3))  # samples of a run are reproducible
    t.train_step()  # the EMA moves: recomputed
    c = t.model.sampling_generator(True)
    assert c is not b and not torch.equal(batch_norms(c)[0].running_mean, batch_norms(b)[0].running_mean)
    t.load_state_dict(t.state_dict())  # a load counts as a change too
    assert t.model.sampling_generator(True) is not c
    off = _toy_trainer("sample.precise_bn_batches=0")
    assert off.model.sampling_generator(True) is off.ema.shadow["generator"].generator
    assert off.model.sampling_generator(False) is off.gen_enc.generator
    train_mode = _toy_trainer("model.sample_bn_mode=train")
    assert train_mode.model.sampling_generator(True) is train_mode.ema.shadow["generator"].generator
