"""Image encoders q_ψ(z | x_k, x_{k+1}, k) (method.md §4): shapes, batch 1, logvar bounds, gradients, parameters."""

import pytest
import torch
import torch.nn.functional as F

from ddaebm.networks.encoders import ConvEncoder, ddgan_init_, minibatch_stddev, stddev_group
from ddaebm.networks.fir import downsample_2d, fir_kernel

SIZES = {"small": 32, "64": 64, "large": 128}  # CIFAR-10, CelebA 64, LSUN church 128


def tiny(kind, **kw):
    """Small widths: the point is the shapes, not the capacity."""
    return ConvEncoder(kind, SIZES[kind], 3, nz=6, ngf=4, t_emb_dim=16, **kw)


def pair(batch, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g), torch.randn(batch, 3, size, size, generator=g)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def strided_count(in_ch, ngf, depth, nz, t):
    """Hand count of the official Encoder_small/_64 with t_emb_dim t (method.md §4)."""
    widths = [ngf * 2**i for i in range(depth)]
    convs = in_ch * widths[0] * 9 + sum(a * b * 16 for a, b in zip(widths[:-1], widths[1:]))
    t_bias = sum(t * w + w for w in widths)
    step = 2 * (t * t + t)
    head = 2 * (widths[-1] * nz * 16 + nz)
    return convs + t_bias + step + head


def test_parameter_counts_at_dataset_configs():
    counts = {kind: n_params(ConvEncoder(kind, size, 3, nz=100)) for kind, size in SIZES.items()}
    print("encoder parameters (nz=100, ngf=64, t_emb_dim=256):", counts)
    # The official CIFAR Encoder_small (6 input channels, nz 100, ngf 64, t_emb_dim 256) has 4.77M parameters.
    assert counts["small"] == strided_count(6, 64, 4, 100, 256) == 4_772_872
    assert counts["64"] == strided_count(6, 64, 5, 100, 256) == 15_063_048
    # DDGAN's large discriminator body + two dense heads: 27.8M.
    assert counts["large"] == 27_839_304


@pytest.mark.parametrize("kind", SIZES)
@pytest.mark.parametrize("batch", [1, 6])
def test_shapes_and_logvar_bounds(kind, batch):
    torch.manual_seed(0)
    enc = tiny(kind, logvar_min=-0.5, logvar_max=0.5)
    for p in enc.parameters():  # large weights push logvar outside the bounds, so the clamp is exercised
        p.data.mul_(5.0)
    x_k, x_k1 = pair(batch, SIZES[kind])
    mu, logvar = enc(x_k, x_k1, torch.randint(0, 4, (batch,)))
    assert mu.shape == logvar.shape == (batch, 6)
    assert torch.isfinite(mu).all() and torch.isfinite(logvar).all()
    assert logvar.min() >= -0.5 and logvar.max() <= 0.5
    if kind == "large":
        assert logvar.max() <= 0  # −softplus: σ² ≤ 1


@pytest.mark.parametrize("kind", SIZES)
def test_gradients_reach_inputs_and_parameters(kind):
    torch.manual_seed(0)
    enc = tiny(kind)
    x_k, x_k1 = pair(4, SIZES[kind])
    x_k.requires_grad_(True)
    x_k1.requires_grad_(True)
    mu, logvar = enc(x_k, x_k1, torch.tensor([0, 1, 2, 3]))
    (mu.pow(2).sum() + logvar.sum()).backward()
    assert x_k.grad.abs().sum() > 0 and x_k1.grad.abs().sum() > 0
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        # The large body's second convs start at ~0 (DDGAN's init_scale 0), so what feeds them gets a ~0 gradient.
        if kind != "large":
            assert p.grad.abs().sum() > 0, name


def test_step_conditioning_changes_the_output():
    torch.manual_seed(0)
    enc = tiny("small")
    x_k, x_k1 = pair(1, 32)
    mu0, _ = enc(x_k, x_k1, torch.tensor([0]))
    mu3, _ = enc(x_k, x_k1, torch.tensor([3]))
    assert (mu0 - mu3).abs().max() > 1e-4


def test_batch_one_output_equals_row_of_larger_batch_for_strided_encoders():
    # Small/64 encoders have no cross-sample statistics: a row of a batch equals the same input alone.
    torch.manual_seed(0)
    enc = tiny("64")
    x_k, x_k1 = pair(3, 64)
    k = torch.tensor([2, 0, 1])
    mu, logvar = enc(x_k, x_k1, k)
    mu1, logvar1 = enc(x_k[1:2], x_k1[1:2], k[1:2])
    torch.testing.assert_close(mu1, mu[1:2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logvar1, logvar[1:2], rtol=1e-4, atol=1e-5)


def test_fir_downsample_is_ddgan_pad_filter_decimate():
    x = torch.randn(2, 3, 8, 8)
    k = fir_kernel()
    assert k.sum().item() == pytest.approx(1.0)
    # upfirdn2d(x, k, down=2, pad=(1, 1)): pad, correlate with the flipped kernel, keep every second pixel.
    ref = F.conv2d(F.pad(x, (1, 1, 1, 1)).reshape(6, 1, 10, 10), k.flip(0, 1)[None, None])[..., ::2, ::2]
    torch.testing.assert_close(downsample_2d(x, k), ref.reshape(2, 3, 4, 4))
    ones = torch.ones(1, 1, 8, 8)  # interior pixels of a constant image stay constant
    assert downsample_2d(ones, k)[0, 0, 1:-1, 1:-1].allclose(torch.ones(2, 2))


@pytest.mark.parametrize("batch,group", [(1, 1), (2, 2), (3, 3), (4, 4), (6, 3), (7, 1), (8, 4), (12, 4)])
def test_stddev_group_is_largest_divisor_up_to_four(batch, group):
    assert stddev_group(batch) == group


def test_minibatch_stddev_matches_the_grouped_formula():
    torch.manual_seed(0)
    h = torch.randn(6, 5, 2, 2)
    out = minibatch_stddev(h)
    assert out.shape == (6, 6, 2, 2)
    torch.testing.assert_close(out[:, :5], h)
    # Group 3 for a batch of 6: sample i is grouped with i ± 2 (DDGAN's view(G, B/G, ...) layout).
    for i in range(6):
        members = h[[j for j in range(6) if j % 2 == i % 2]]
        expected = (members.var(0, unbiased=False) + 1e-8).sqrt().mean()
        assert out[i, 5].allclose(expected.expand(2, 2))
    single = minibatch_stddev(h[:1])
    assert single[0, 5].allclose(torch.full((2, 2), 1e-4))


def test_ddgan_init_uses_fan_out():
    # DDGAN's variance_scaling "fan_avg" falls through to fan_out: bound √(3/(out·k²)).
    w = ddgan_init_(torch.empty(50, 7, 3, 3))
    bound = (3 / (50 * 9)) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert ddgan_init_(torch.empty(8, 8), scale=0.0).abs().max() < 1e-5


def test_rejects_bad_kind_and_size():
    with pytest.raises(ValueError):
        ConvEncoder("huge", 32, 3, 8)
    with pytest.raises(ValueError):
        ConvEncoder("large", 96, 3, 8, ngf=4, t_emb_dim=16)  # 96 is not divisible by 2⁶
    with pytest.raises(ValueError):
        ConvEncoder("64", 40, 3, 8, ngf=4, t_emb_dim=16)
