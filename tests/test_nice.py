"""MNIST networks (method.md §7.5): NICE_t is an exact, normalised, invertible density for every k; the MLP G/E
and the logit preprocessing."""

import math

import pytest
import torch

from ddaebm.config import load_config
from ddaebm.networks import build_energy, build_generator_encoder
from ddaebm.networks.mnist import MLPEncoder, MLPGenerator, NICEEnergy, from_logit, logit_transform
from tests.conftest import CONFIGS


def noisy(model, scale, seed=0):
    """The model with N(0, scale²) noise added to every parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def small_nice(dim=16, seed=0, scale=0.3):
    """A NICE_t moved off the identity: noise on the zero-initialised output layers and on the per-k scales
    (the hidden layers keep their random init, so m depends on x and k)."""
    torch.manual_seed(seed)
    nice = NICEEnergy(dim, hidden=32, num_hidden=3, t_emb_dim=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in nice.couplings:
            m.out.weight.normal_(0, scale, generator=g)
            m.out.bias.normal_(0, scale, generator=g)
        nice.log_scale.normal_(0, 0.2, generator=g)
    return nice


def steps(n, k):
    return torch.full((n,), k, dtype=torch.long)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def std_normal_logpdf(y):
    return -0.5 * (y.pow(2).sum(1) + y.shape[1] * math.log(2 * math.pi))


# ----------------------------------------------------------------------------------------------- NICE_t


def test_identity_at_initialisation():
    nice = NICEEnergy(16, hidden=32, num_hidden=3, t_emb_dim=8)
    x = torch.randn(5, 16)
    for k in range(4):
        torch.testing.assert_close(nice(x, steps(5, k)), std_normal_logpdf(x))


@pytest.mark.parametrize("k", range(4))
def test_inverse_of_transform_is_identity(k):
    nice = small_nice()
    x = 3 * torch.randn(64, 16)
    y, _ = nice.transform(x, steps(64, k))
    assert (y - x).abs().max() > 0.1  # the perturbed flow is far from the identity
    assert (nice.inverse(y, steps(64, k)) - x).abs().max() < 1e-4
    assert (nice.transform(nice.inverse(x, steps(64, k)), steps(64, k))[0] - x).abs().max() < 1e-4


def test_mixed_steps_in_one_batch_match_single_step_batches():
    nice = small_nice()
    x, k = torch.randn(8, 16), torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    mixed = nice(x, k)
    for i in range(8):
        torch.testing.assert_close(mixed[i:i + 1], nice(x[i:i + 1], k[i:i + 1]))


def test_log_density_equals_change_of_variables_with_autograd_jacobian():
    nice = small_nice(dim=2).double()
    torch.manual_seed(1)
    for k in range(4):
        for x in torch.randn(5, 2, dtype=torch.float64):
            jac = torch.autograd.functional.jacobian(lambda v: nice.transform(v[None], steps(1, k))[0][0], x)
            y, log_det = nice.transform(x[None], steps(1, k))
            assert log_det.item() == pytest.approx(torch.linalg.det(jac).abs().log().item(), abs=1e-9)
            expected = std_normal_logpdf(y) + torch.linalg.det(jac).abs().log()
            torch.testing.assert_close(nice(x[None], steps(1, k)), expected)
            torch.testing.assert_close(nice.log_density(x[None], steps(1, k)), expected)


def grid_density(nice, k, half_width=8.0, n=401):
    """(points [n², 2], p on the grid, cell area) for a 2-D NICE."""
    axis = torch.linspace(-half_width, half_width, n, dtype=torch.float64)
    points = torch.cartesian_prod(axis, axis)
    with torch.no_grad():
        p = nice(points, steps(len(points), k)).exp()
    return points, p, (axis[1] - axis[0]).item() ** 2


@pytest.mark.parametrize("k", [0, 3])
def test_density_integrates_to_one_and_samples_follow_it(k):
    nice = small_nice(dim=2, seed=2, scale=0.2).double()
    points, p, area = grid_density(nice, k)
    assert (p.sum() * area).item() == pytest.approx(1.0, abs=1e-4)
    # Exact samples (inverted N(0, I) draws) have the grid density's moments.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x = nice.sample(20_000, k, generator=g)
    weights = (p * area)[:, None]
    mean, second = (weights * points).sum(0), (weights * points.pow(2)).sum(0)
    stderr = ((second - mean.pow(2)) / len(x)).sqrt()
    assert ((x.mean(0) - mean).abs() < 4 * stderr).all()
    assert x.pow(2).mean(0).allclose(second, rtol=0.05)


def test_samples_have_the_model_log_density():
    nice = small_nice()
    g = torch.Generator().manual_seed(0)
    k = 2
    with torch.no_grad():
        x = nice.sample(4000, k, generator=g)
        log_p = nice(x, steps(4000, k))
    # E_p[log p] = −H(p) = −(d/2)·log(2πe) + Σ s_k for a volume-preserving flow followed by the scale layer.
    neg_entropy = -8 * math.log(2 * math.pi * math.e) + nice.log_scale[k].sum().item()
    assert log_p.mean().item() == pytest.approx(neg_entropy, abs=4 * log_p.std().item() / math.sqrt(4000))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        y = torch.randn(4000, 16, generator=g)
        assert (nice.transform(x, steps(4000, k))[0] - y).abs().max() < 1e-4


def test_log_density_depends_on_k_once_trained():
    nice = small_nice()
    x = torch.randn(10, 16)
    values = torch.stack([nice(x, steps(10, k)) for k in range(4)])
    for a in range(4):
        for b in range(a + 1, 4):
            assert (values[a] - values[b]).abs().max() > 1e-3


def test_second_derivatives_for_the_gradient_penalty():
    nice = small_nice()
    x = torch.randn(6, 16, requires_grad=True)
    (grad,) = torch.autograd.grad(nice(x, steps(6, 1)).sum(), x, create_graph=True)
    grad.pow(2).sum().backward()
    assert all(p.grad is not None for p in nice.couplings[0].w.parameters())
    assert nice.couplings[0].out.weight.grad.abs().sum() > 0


def test_mnist_size_shape_count_and_inverse():
    torch.manual_seed(0)
    nice = NICEEnergy()
    # 4 couplings × [392→1000, 4 × 1000→1000, 1000→392, 5 step projections 64→1000, 10 PReLU slopes]
    # + e(k): 64→64 + per-k scales 4 × 784.
    coupling = (392 * 1000 + 1000) + 4 * (1000 * 1000 + 1000) + (1000 * 392 + 392) + 5 * (64 * 1000 + 1000) + 10
    assert n_params(nice) == 4 * coupling + (64 * 64 + 64) + 4 * 784 == 20_464_904
    print("MNIST NICE_t parameters:", n_params(nice))
    for coupling_net in nice.couplings:  # move the flow off the identity
        torch.nn.init.normal_(coupling_net.out.weight, std=0.01)
    x, k = torch.randn(3, 784), torch.tensor([0, 1, 3])
    out = nice(x, k)
    assert out.shape == (3,) and torch.isfinite(out).all()
    y, _ = nice.transform(x, k)
    assert (nice.inverse(y, k) - x).abs().max() < 1e-4


# --------------------------------------------------------------------------------------- preprocessing


def test_logit_transform_round_trip_within_dequantisation():
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (8, 1, 28, 28), generator=g).float() / 255
    pixels[0, 0, 0, :2] = torch.tensor([0.0, 1.0])
    x = logit_transform(pixels, generator=g)
    assert x.shape == (8, 784)
    bound = math.log(1e-3 / (1 - 1e-3))
    assert x.min() >= bound - 1e-4 and x.max() <= -bound + 1e-4
    back = from_logit(x).view_as(pixels)
    assert (back - pixels).abs().max() <= 1 / 512 + 1e-6
    # Dequantisation is random but reproducible from the generator.
    again = logit_transform(pixels, generator=torch.Generator().manual_seed(1))
    same = logit_transform(pixels, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again, same) and not torch.equal(again, x)


# ---------------------------------------------------------------------------------- MLP generator / encoder


def small_g():
    return MLPGenerator(dim=16, nz=4, branch=(32, 32), widths=(32, 32), t_emb_dim=8)


def small_e(**kw):
    return MLPEncoder(dim=16, nz=4, branch=(48, 32), widths=(32,), t_emb_dim=8, **kw)


@pytest.mark.parametrize("batch", [1, 5])
def test_generator_shape_and_gradients(batch):
    torch.manual_seed(0)
    gen = small_g()
    x_k1 = torch.randn(batch, 16, requires_grad=True)
    z = torch.randn(batch, 4, requires_grad=True)
    out = gen(x_k1, torch.randint(0, 4, (batch,)), z)
    assert out.shape == (batch, 16)
    out.pow(2).sum().backward()
    assert x_k1.grad.abs().sum() > 0 and z.grad.abs().sum() > 0
    for name, p in gen.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("batch", [1, 5])
def test_encoder_shape_bounds_and_gradients(batch):
    torch.manual_seed(0)
    enc = noisy(small_e(logvar_min=-0.5, logvar_max=0.5), scale=1.0)
    x_k = torch.randn(batch, 16, requires_grad=True)
    x_k1 = torch.randn(batch, 16, requires_grad=True)
    mu, logvar = enc(x_k, x_k1, torch.randint(0, 4, (batch,)))
    assert mu.shape == logvar.shape == (batch, 4)
    assert logvar.min() >= -0.5 and logvar.max() <= 0.5
    torch.manual_seed(0)
    enc = small_e()
    mu, logvar = enc(x_k, x_k1, torch.randint(0, 4, (batch,)))
    (mu.pow(2).sum() + logvar.exp().sum()).backward()
    assert x_k.grad.abs().sum() > 0 and x_k1.grad.abs().sum() > 0
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_generator_and_encoder_depend_on_k():
    torch.manual_seed(0)
    gen, enc = small_g(), small_e()
    x, z = torch.randn(1, 16), torch.randn(1, 4)
    assert (gen(x, steps(1, 0), z) - gen(x, steps(1, 3), z)).abs().max() > 1e-4
    assert (enc(x, x, steps(1, 0))[0] - enc(x, x, steps(1, 3))[0]).abs().max() > 1e-4


def test_mnist_size_generator_and_encoder():
    gen, enc = MLPGenerator(), MLPEncoder()
    # G: 834→1600→1600 | t: 50→50→100 | 1700→1600→1600→784; E: 1568→3200→1600 | t | 1700→1600→100.
    step = (50 * 50 + 50) + (50 * 100 + 100) + 1
    assert n_params(gen) == (834 * 1600 + 1600) + (1600 * 1600 + 1600) + 1 + step + (1700 * 1600 + 1600) \
        + (1600 * 1600 + 1600) + (1600 * 784 + 784) + 2 == 10_443_638
    assert n_params(enc) == (1568 * 3200 + 3200) + (3200 * 1600 + 1600) + 1 + step + (1700 * 1600 + 1600) \
        + (1600 * 100 + 100) + 1 == 13_031_753
    print("MNIST G / E parameters:", n_params(gen), n_params(enc))
    x, k = torch.randn(1, 784), torch.tensor([3])
    assert gen(x, k, torch.randn(1, 50)).shape == (1, 784)
    mu, logvar = enc(x, x, k)
    assert mu.shape == logvar.shape == (1, 50)


@pytest.mark.parametrize("config, width", [("mnist_nice.yaml", 1600), ("small/mnist_nice.yaml", 400)])
def test_mlp_width_sets_the_generator_and_encoder_not_the_energy(config, width):
    cfg = load_config(CONFIGS / config).model
    assert cfg.mlp_width == width
    ge = build_generator_encoder(cfg)
    # Generator: x-branch (784+50)→w→w, step branch 50→50→100, decoder (w+100)→w→w→784, 4 PReLU slopes.
    step_branch = 50 * 50 + 50 + 50 * 100 + 100
    gen = (834 * width + width + width * width + width + step_branch + (width + 100) * width + width
           + width * width + width + width * 784 + 784 + 4)
    assert n_params(ge.generator) == gen
    # Encoder: x-branch 1568→2w→w, the same step branch, decoder (w+100)→w→2·50, 3 PReLU slopes.
    enc = (1568 * 2 * width + 2 * width + 2 * width * width + width + step_branch + (width + 100) * width + width
           + width * 100 + 100 + 3)
    assert n_params(ge.encoder) == enc
    assert n_params(build_energy(cfg)) == 20_464_904
    if width == 1600:  # the paper's networks (README table)
        assert (round(n_params(ge.generator) / 1e4), round(n_params(ge.encoder) / 1e4)) == (1044, 1303)


def test_mlp_skip_adds_a_learned_gain_per_step_on_x_k1_starting_at_sqrt_alpha_bar():
    """model.mlp_skip: G(x_{k+1}, k, z) = MLP(x_{k+1}, z, k) + g_k·x_{k+1}, one learned gain per step, which the
    model starts at √ᾱ_{k+1} (the MNIST schedule's: .8452, .5247, .2392, .0801, SPEC §1 table)."""
    from ddaebm.model import Model

    cfg = load_config(CONFIGS / "small" / "mnist_nice.yaml", ["model.mlp_skip=true", "model.mlp_width=16"])
    torch.testing.assert_close(Model(cfg).gen_enc.generator.gain.detach(),
                               torch.tensor([.7144, .27526, .0572, .00641]).sqrt(), atol=2e-4, rtol=0)
    torch.manual_seed(0)
    gains = torch.tensor([1.5, -0.5, 0.25, 0.0])
    gen = build_generator_encoder(cfg.model, with_encoder=False, skip_gains=gains.tolist()).generator
    plain = MLPGenerator(nz=50, branch=(16, 16), widths=(16, 16))
    assert n_params(gen) == n_params(plain) + 4
    plain.load_state_dict({key: v for key, v in gen.state_dict().items() if key != "gain"})
    x, k, z = torch.randn(6, 784), torch.tensor([0, 1, 2, 3, 0, 3]), torch.randn(6, 50)
    torch.testing.assert_close(gen(x, k, z), plain(x, k, z) + gains[k].unsqueeze(1) * x)
    gen.zero_grad()
    gen(x, k, z).sum().backward()
    # d/dg_j of Σ out = Σ over the rows with k = j of Σ x: each step's gain gets its own rows' gradient.
    torch.testing.assert_close(gen.gain.grad, torch.stack([x[k == j].sum() for j in range(4)]))
    assert load_config(CONFIGS / "small" / "mnist_nice.yaml").model.mlp_skip is False  # the paper's network
