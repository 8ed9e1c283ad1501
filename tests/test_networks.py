"""Toy networks (method.md §2-§4): shapes, the step embedding, and the folded first layer against its literal form."""

import math

import pytest
import torch

from ddaebm.config import ModelConfig
from ddaebm.networks import build_energy, build_generator_encoder
from ddaebm.networks.embedding import sinusoidal_embedding
from ddaebm.networks.toy import BranchedInput


def test_sinusoidal_embedding_values():
    e = sinusoidal_embedding(torch.tensor([0, 3]), 16)
    assert e.shape == (2, 16)
    freqs = [math.exp(-i * math.log(1e4) / 7) for i in range(8)]
    assert e[1, :8].tolist() == pytest.approx([math.sin(3 * f) for f in freqs], abs=1e-6)
    assert e[1, 8:].tolist() == pytest.approx([math.cos(3 * f) for f in freqs], abs=1e-6)
    assert e[0].tolist() == [0.0] * 8 + [1.0] * 8


@pytest.mark.parametrize("norm", ["none", "batch"])
def test_branched_input_equals_concatenated_form(norm):
    torch.manual_seed(0)
    m = BranchedInput(4, 300, 16, norm)
    x = torch.randn(64, 4, requires_grad=True)
    k = torch.randint(0, 4, (64,))
    fast, slow = m(x, k), m.direct(x, k)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    params = [x, *m.parameters()]
    g_fast = torch.autograd.grad(fast.pow(2).sum(), params)
    g_slow = torch.autograd.grad(slow.pow(2).sum(), params)
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_shapes_and_parameter_counts():
    cfg = ModelConfig()
    energy = build_energy(cfg)
    gen_enc = build_generator_encoder(cfg)
    x, k, z = torch.randn(7, 2), torch.randint(0, 4, (7,)), torch.randn(7, 2)
    assert energy(x, k).shape == (7,)
    assert gen_enc.generator(x, k, z).shape == (7, 2)
    mu, logvar = gen_enc.encoder(x, x, k)
    assert mu.shape == logvar.shape == (7, 2)
    assert logvar.min() >= cfg.logvar_min and logvar.max() <= cfg.logvar_max
    counts = {name: sum(p.numel() for p in m.parameters())
              for name, m in (("energy", energy), ("generator", gen_enc.generator), ("encoder", gen_enc.encoder))}
    # 2→16→32 | t: 16→16→32 | 64→300→300→1 with one-slope PReLUs.
    assert counts["energy"] == (2 * 16 + 16 + 1 + 16 * 32 + 32) + (16 * 16 + 16 + 1 + 16 * 32 + 32) \
        + (64 * 300 + 300 + 1 + 300 * 300 + 300 + 1 + 300 + 1)
    assert counts["generator"] > 100_000 and counts["encoder"] > counts["generator"]


def test_prelu_matches_torch_and_has_second_derivatives():
    from ddaebm.networks.layers import PReLU, _PReLUFunction

    x = torch.randn(40, 30, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_PReLUFunction.apply, (x, w))
    assert torch.autograd.gradgradcheck(_PReLUFunction.apply, (x, w))
    ours, ref = PReLU(), torch.nn.PReLU()
    xf = torch.randn(100, 7)
    torch.testing.assert_close(ours(xf), ref(xf), rtol=0, atol=0)


def test_energy_base_measure_adds_a_gaussian_at_step_zero_only():
    """model.energy_base_std = s: f(x, 0) gains log N(x; 0, s²I) (up to its constant), f(x, k > 0) is unchanged,
    and the base has no parameters."""
    torch.manual_seed(0)
    plain = build_energy(ModelConfig())
    torch.manual_seed(0)
    based = build_energy(ModelConfig(energy_base_std=0.5))
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in based.named_parameters()]
    x = torch.tensor([[0.0, 0.0], [1.0, -2.0], [3.0, 4.0], [3.0, 4.0]])
    k = torch.tensor([0, 0, 0, 2])
    diff = based(x, k) - plain(x, k)
    torch.testing.assert_close(diff, torch.tensor([0.0, -5.0 / 0.5, -25.0 / 0.5, 0.0]))
