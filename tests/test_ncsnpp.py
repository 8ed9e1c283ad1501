"""The image U-Nets (method.md §2, §3, §8) and their plain-PyTorch FIR resampling (method.md §11 B8)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddaebm.networks import fir
from ddaebm.networks.ncsnpp import NCSNppEnergy, NCSNppGenerator
from ddaebm.networks.ncsnpp_blocks import AttnBlock, ResBlock
from tests.conftest import CONFIGS

# Small enough for a CPU test, yet every part is exercised: two resolutions, attention, FIR pyramid, z-AdaGN.
SMALL = dict(image_size=16, channels=3, nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.1,
             fir=True, progressive_input="residual", num_steps=4)
DDPMPP = dict(SMALL, fir=False, progressive_input="none", dropout=0.0)  # the LSUN variant
GEN = dict(nz=8, z_emb_dim=32, n_mlp=2)

CIFAR = dict(image_size=32, channels=3, nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
             dropout=0.1, fir=True, progressive_input="residual", num_steps=4)
CELEBA64 = dict(CIFAR, image_size=64, nf=64, ch_mult=(1, 1, 2, 2, 4))
LSUN128 = dict(CIFAR, image_size=128, nf=64, ch_mult=(1, 2, 2, 4, 4), dropout=0.0, fir=False, progressive_input="none")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _inputs(cfg, batch=3, dtype=torch.float32):
    x = torch.randn(batch, cfg["channels"], cfg["image_size"], cfg["image_size"], dtype=dtype)
    k = torch.arange(batch) % cfg["num_steps"]
    return x, k


def _perturb_output(net):
    """Make the (near-)zero-initialised layers non-zero: the output conv, the last conv of every residual branch and
    every attention output. At init z only reaches G's output through those branches (~1e-6), and U is zero."""
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, ResBlock):
                module.conv1.weight.normal_(0.0, 0.02)
            elif isinstance(module, AttnBlock):
                module.out.W.normal_(0.0, 0.02)
        net.unet.conv_out.weight.normal_(0.0, 0.05)
        net.unet.conv_out.bias.normal_(0.0, 0.05)
    return net


def _count(module):
    return sum(p.numel() for p in module.parameters())


# --- FIR resampling -----------------------------------------------------------------------------------------------

def _upfirdn2d_loop(x, kernel, up, down, pad):
    """Slow reference: zero insertion, zero/crop padding, true 2-D convolution, decimation, one pixel at a time."""
    b, c, h, w = x.shape
    up_x = np.zeros((b, c, h * up, w * up))
    up_x[:, :, ::up, ::up] = x
    p0, p1 = pad
    padded = np.zeros((b, c, h * up + p0 + p1, w * up + p0 + p1))
    src = up_x[:, :, max(-p0, 0):h * up - max(-p1, 0), max(-p0, 0):w * up - max(-p1, 0)]
    padded[:, :, max(p0, 0):max(p0, 0) + src.shape[2], max(p0, 0):max(p0, 0) + src.shape[3]] = src
    kh, kw = kernel.shape
    out_h, out_w = (padded.shape[2] - kh) // down + 1, (padded.shape[3] - kw) // down + 1
    out = np.zeros((b, c, out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            for a in range(kh):
                for e in range(kw):
                    out[:, :, i, j] += padded[:, :, i * down + a, j * down + e] * kernel[kh - 1 - a, kw - 1 - e]
    return out


@pytest.mark.parametrize("up,down,pad", [(1, 1, (1, 2)), (2, 1, (2, 1)), (1, 2, (1, 1)), (2, 2, (0, 1)),
                                         (1, 1, (-1, 2))])
def test_upfirdn2d_matches_loop(up, down, pad):
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    kernel = torch.rand(4, 3, dtype=torch.float64)  # asymmetric, so a missing flip would show
    got = fir.upfirdn2d(x, kernel, up=up, down=down, pad=pad)
    np.testing.assert_allclose(got.numpy(), _upfirdn2d_loop(x.numpy(), kernel.numpy(), up, down, pad), atol=1e-12)


def test_fir_kernel_is_normalised_outer_product():
    expected = torch.outer(torch.tensor([1.0, 3, 3, 1]), torch.tensor([1.0, 3, 3, 1])) / 64
    torch.testing.assert_close(fir.fir_kernel(), expected)


def test_fir_resampling_keeps_a_constant_away_from_the_border():
    x = torch.full((1, 2, 8, 8), 0.7)
    kernel = fir.fir_kernel()
    down, up = fir.downsample_2d(x, kernel), fir.upsample_2d(x, kernel)
    assert down.shape == (1, 2, 4, 4) and up.shape == (1, 2, 16, 16)
    torch.testing.assert_close(down[..., 1:-1, 1:-1], torch.full((1, 2, 2, 2), 0.7))
    torch.testing.assert_close(up[..., 1:-1, 1:-1], torch.full((1, 2, 14, 14), 0.7))
    assert down[0, 0, 0, 0] < 0.7  # the border sees the zero padding


def test_fused_resampling_convs_equal_resample_then_conv_inside():
    """upsample_conv_2d = upsample_2d then conv, conv_downsample_2d = conv then downsample_2d, up to the border."""
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    kernel = fir.fir_kernel().double()
    up = fir.upsample_conv_2d(x, w, kernel)
    assert up.shape == (2, 5, 16, 16)
    torch.testing.assert_close(up[..., 2:-2, 2:-2], F.conv2d(fir.upsample_2d(x, kernel), w, padding=1)[..., 2:-2, 2:-2])
    down = fir.conv_downsample_2d(x, w, kernel)
    assert down.shape == (2, 5, 4, 4)
    expected = fir.downsample_2d(F.conv2d(x, w, padding=1), kernel)
    torch.testing.assert_close(down[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1])


def test_naive_resampling_is_repeat_and_block_mean():
    x = torch.randn(2, 3, 4, 6)
    torch.testing.assert_close(fir.naive_upsample_2d(x), x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    torch.testing.assert_close(fir.naive_downsample_2d(x), x.reshape(2, 3, 2, 2, 3, 2).mean(dim=(3, 5)))


def test_fir_ops_have_first_and_second_derivatives():
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    kernel = fir.fir_kernel().double()
    for fn in (lambda x, w: fir.upsample_2d(x, kernel).square(), lambda x, w: fir.downsample_2d(x, kernel).square(),
               lambda x, w: fir.upsample_conv_2d(x, w, kernel).square(),
               lambda x, w: fir.conv_downsample_2d(x, w, kernel).square()):
        assert torch.autograd.gradcheck(fn, (x, w))
        assert torch.autograd.gradgradcheck(fn, (x, w))


# --- the networks -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [SMALL, DDPMPP, dict(SMALL, channels=1)], ids=["ncsnpp", "ddpmpp", "one-channel"])
def test_output_shapes(cfg):
    x, k = _inputs(cfg)
    energy, gen = NCSNppEnergy(**cfg), NCSNppGenerator(**cfg, **GEN)
    assert energy(x, k).shape == (3,)
    assert energy.unet_output(x, k).shape == x.shape
    assert gen(x, k, torch.randn(3, GEN["nz"])).shape == x.shape


@pytest.mark.parametrize("cfg", [SMALL, DDPMPP], ids=["ncsnpp", "ddpmpp"])
def test_energy_at_init_is_minus_half_squared_norm(cfg):
    x, k = _inputs(cfg, batch=4)
    f = NCSNppEnergy(**cfg)(x, k)
    assert f.dtype == torch.float32
    torch.testing.assert_close(f, -0.5 * x.square().sum(dim=(1, 2, 3)))


def test_generator_is_bounded_and_depends_on_z():
    gen = NCSNppGenerator(**SMALL, **GEN).eval()
    x, k = _inputs(SMALL)
    assert gen(x, k, torch.randn(3, GEN["nz"])).abs().max() == 0  # zero output conv: tanh(0)
    _perturb_output(gen)
    out1, out2 = gen(x, k, torch.randn(3, GEN["nz"])), gen(x, k, torch.randn(3, GEN["nz"]))
    assert out1.abs().max() < 1 and out1.std() > 1e-3
    assert (out1 - out2).abs().max() > 1e-2


def test_generator_z_mapping_and_adagn_init():
    gen = NCSNppGenerator(**SMALL, **GEN)
    assert len([m for m in gen.z_mapping if isinstance(m, torch.nn.Linear)]) == 1 + GEN["n_mlp"]
    style = gen.unet.down[0].blocks[0].block.norm0.style  # AdaGN: bias = [γ = 1 …, β = 0 …]
    width = style.out_features // 2
    assert torch.equal(style.bias[:width], torch.ones(width)) and torch.equal(style.bias[width:], torch.zeros(width))


def test_batch_size_one():
    x, k = _inputs(SMALL, batch=1)
    energy, gen = _perturb_output(NCSNppEnergy(**SMALL)), NCSNppGenerator(**SMALL, **GEN)
    assert energy(x, k).shape == (1,)
    assert gen(x, k, torch.randn(1, GEN["nz"])).shape == x.shape


@pytest.mark.parametrize("cfg", [SMALL, DDPMPP], ids=["ncsnpp", "ddpmpp"])
def test_channels_last_matches_contiguous(cfg):
    x, k = _inputs(cfg)
    z = torch.randn(3, GEN["nz"])
    energy = _perturb_output(NCSNppEnergy(**cfg)).eval()
    gen = _perturb_output(NCSNppGenerator(**cfg, **GEN)).eval()
    x_cl = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(energy.unet_output(x_cl, k), energy.unet_output(x, k), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gen(x_cl, k, z), gen(x, k, z), atol=1e-5, rtol=1e-4)
    energy_cl = energy.to(memory_format=torch.channels_last)
    torch.testing.assert_close(energy_cl(x_cl, k), energy(x, k), atol=1e-3, rtol=1e-5)


def test_bf16_autocast_runs_and_energy_stays_fp32():
    x, k = _inputs(SMALL)
    energy = _perturb_output(NCSNppEnergy(**SMALL)).eval()
    gen = NCSNppGenerator(**SMALL, **GEN).eval()
    reference = energy(x, k)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f = energy(x, k)
        out = gen(x, k, torch.randn(3, GEN["nz"]))
    assert f.dtype == torch.float32 and torch.isfinite(f).all()
    torch.testing.assert_close(f, reference, rtol=2e-2, atol=0.0)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_r1_double_backward_reaches_every_parameter():
    """The R1 penalty differentiates ‖∇_x f‖² with respect to θ (method.md §5)."""
    energy = _perturb_output(NCSNppEnergy(**SMALL))
    x, k = _inputs(SMALL)
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(energy(x, k).sum(), x, create_graph=True)
    assert grad.shape == x.shape
    grad.square().sum().backward()
    grads = {name: p.grad for name, p in energy.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["unet.conv_in.weight"].abs().max() > 0


def test_generator_backward_reaches_the_z_mapping():
    gen = _perturb_output(NCSNppGenerator(**SMALL, **GEN))
    x, k = _inputs(SMALL)
    gen(x, k, torch.randn(3, GEN["nz"])).square().sum().backward()
    assert gen.z_mapping[1].weight.grad.abs().max() > 0


def test_unknown_progressive_input_is_rejected():
    with pytest.raises(ValueError, match="progressive_input"):
        NCSNppEnergy(**dict(SMALL, progressive_input="input_skip"))


@pytest.mark.parametrize("cfg,gen_count,energy_count", [
    (CIFAR, 48_432_515, 40_279_171),  # the official networks: 48.4M and 40.3M
    (CELEBA64, 25_651_843, 19_693_955),
    (LSUN128, 37_902_403, 30_273_347),
], ids=["cifar10", "celeba64", "lsun128"])
def test_parameter_counts_match_the_official_networks(cfg, gen_count, energy_count):
    """Counts of the official DDGAN generator / DDAEBM energy for each config (nz 100, z_emb 256, 4 mapping layers)."""
    with torch.device("meta"):
        gen, energy = NCSNppGenerator(**cfg), NCSNppEnergy(**cfg)
    assert (_count(gen), _count(energy)) == (gen_count, energy_count)


@pytest.mark.parametrize("up, down, pad", [(1, 2, (1, 1)), (2, 1, (2, 1)), (1, 1, (1, 2)), (1, 2, (-1, 1)),
                                           (2, 1, (1, 0))])
def test_separable_taps_equal_the_2d_kernel(up, down, pad):
    """The networks' fast separable path (1-D taps) is the same filter as the depthwise 2-D convolution."""
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    got = fir.upfirdn2d(x, fir.fir_taps().double(), up=up, down=down, pad=pad)
    torch.testing.assert_close(got, fir.upfirdn2d(x, fir.fir_kernel().double(), up=up, down=down, pad=pad))
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    for fn in (fir.upsample_2d, fir.downsample_2d):
        torch.testing.assert_close(fn(x, fir.fir_taps().double()), fn(x, fir.fir_kernel().double()))
    torch.testing.assert_close(fir.upsample_conv_2d(x, w, fir.fir_taps().double()),
                               fir.upsample_conv_2d(x, w, fir.fir_kernel().double()))


def test_separable_taps_double_backward():
    taps = fir.fir_taps().double()
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: fir.upsample_2d(t, taps).square(), (x,))
    assert torch.autograd.gradgradcheck(lambda t: fir.downsample_2d(t[..., :4, :4], taps).square(), (x,))


def test_bf16_training_step_follows_fp32():
    """dist.precision=bf16 on the CPU (the CIFAR-10 networks at tiny width, torch backend): the energy step's loss
    with R1 and the generator step's loss stay within bf16 rounding of fp32, and the parameter gradients point
    the same way, so bf16 trains the same objective (what bench/image_step.py's bf16 variants time)."""
    from ddaebm.config import load_config
    from ddaebm.losses import energy_loss, generator_loss
    from ddaebm.training.trainer import Trainer

    x0 = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    trainers = [Trainer(load_config(CONFIGS / "tiny" / "cifar10.yaml", [f"dist.precision={p}"]))
                for p in ("fp32", "bf16")]
    out = []
    for t in trainers:
        t._stream = type("Fixed", (), {"next_batch": staticmethod(lambda: x0.clone())})()
        torch.manual_seed(1)
        t._train_only("generator")
        b = t._draw()
        grads = {}
        for name, fn in (("energy", lambda: energy_loss(t.energy, t.schedule, b, t.cfg.loss, with_r1=True)),
                         ("generator", lambda: generator_loss(t.energy, t.gen_enc, t.schedule, b, t.cfg.loss,
                                                              t.terms))):
            t._train_only(name)
            t.modules[name].zero_grad(set_to_none=True)
            loss, _ = fn()
            loss.backward(retain_graph=True)
            grads[name] = (loss.item(), torch.cat([p.grad.flatten() for p in t.modules[name].parameters()
                                                   if p.grad is not None]))
        out.append(grads)
    for name in ("energy", "generator"):
        (l32, g32), (l16, g16) = out[0][name], out[1][name]
        assert l16 == pytest.approx(l32, rel=2e-2, abs=2e-2), name
        cosine = torch.nn.functional.cosine_similarity(g32, g16, dim=0).item()
        assert cosine > 0.99, (name, cosine)
        assert not torch.equal(g32, g16)  # bf16 really ran
