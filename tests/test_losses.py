"""The energy and generator objectives: each switch and ablation changes just the terms it names (method.md §5-§6)."""

import dataclasses

import pytest
import torch
from torch import nn

from ddaebm.config import DiffusionConfig, LossConfig, ModelConfig
from ddaebm.diffusion.schedule import build_schedule, log_transition
from ddaebm.losses import (ABLATIONS, draw_step_batch, draw_steps, energy_loss, generator_loss, kl_to_standard_normal,
                           latent_nll, nce_log_ratio, nce_value, r1_expected_constant)
from ddaebm.networks import build_energy, build_generator_encoder

SCHEDULE = build_schedule(DiffusionConfig())


class ZeroEnergy(nn.Module):
    """f ≡ 0 with a parameter, so the penalty is differentiable in θ but ∇_x f = 0."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))

    def forward(self, x, k):
        return (x * 0).sum(1) + self.w.sum() * 0


def _setup(ablation="full", seed=0, n=64):
    torch.manual_seed(seed)
    terms = ABLATIONS[ablation]
    energy = build_energy(ModelConfig())
    gen_enc = build_generator_encoder(ModelConfig(), with_encoder=terms.encoder)
    x0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    b = draw_step_batch(x0, SCHEDULE, gen_enc.generator, terms, 2, torch.Generator().manual_seed(seed + 1))
    return energy, gen_enc, terms, b


def test_r1_constant_full_conditional():
    """With f ≡ 0 the full-conditional penalty averages to (γ/2)·d·a²/σ² (method.md §5, §13), ±3%.

    method.md §13 asks for 1e4 samples; its k = 0 terms are χ²₂-distributed, so 1e4 leaves a 2% standard error:
    4e4 keeps the 3% bound at three standard errors.
    """
    energy = ZeroEnergy()
    cfg = LossConfig(r1_gamma=0.02)
    x0 = torch.randn(40_000, 2, generator=torch.Generator().manual_seed(0))
    gen = lambda x, k, z: x  # noqa: E731  (the fake is irrelevant here)
    b = draw_step_batch(x0, SCHEDULE, gen, ABLATIONS["full"], 2, torch.Generator().manual_seed(1))
    _, stats = energy_loss(energy, SCHEDULE, b, cfg)
    expected = 0.5 * 0.02 * 2 * (SCHEDULE.a[1:] ** 2 / SCHEDULE.beta[1:]).mean()  # k uniform on 0..3
    assert stats["r1"].item() == pytest.approx(expected.item(), rel=0.03)
    assert stats["r1"].item() == pytest.approx(r1_expected_constant(SCHEDULE, b.k, 2, 0.02).item(), rel=0.03)
    _, only = energy_loss(energy, SCHEDULE, b, dataclasses.replace(cfg, r1_target="energy_only"))
    assert only["r1"].item() == 0.0


def test_step_probs_set_how_often_each_step_is_drawn():
    """loss.step_probs: each k's share of the rows follows the normalised weights (4σ of a binomial), a zero
    weight never draws its step, and the default stays the uniform draw that runs before it were trained with."""
    total, probs = 40_000, [1.0, 1.0, 3.0, 0.0]
    counts = torch.bincount(draw_steps(total, 4, torch.Generator().manual_seed(0), probs), minlength=4)
    expected = torch.tensor(probs, dtype=torch.float64) / sum(probs)
    tolerance = 4 * (expected * (1 - expected) / total).sqrt()
    assert ((counts / total - expected).abs() <= tolerance).all() and counts[3] == 0, counts
    uniform = draw_steps(1000, 4, torch.Generator().manual_seed(3))
    assert torch.equal(uniform, torch.randint(0, 4, (1000,), generator=torch.Generator().manual_seed(3)))


def test_r1_penalty_matches_autograd_of_full_conditional():
    energy, _, _, b = _setup()
    cfg = LossConfig(r1_gamma=0.3)
    _, stats = energy_loss(energy, SCHEDULE, b, cfg)
    x = b.x_k.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad((energy(x, b.k) + log_transition(SCHEDULE, x, b.x_k1, b.k)).sum(), x)
    assert stats["r1"].item() == pytest.approx((0.15 * g.pow(2).sum(1).mean()).item(), rel=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_r1_gamma_per_step(fused):
    """loss.r1_gamma_scale prices each row's penalty at r1_gamma times its step's factor: factors of 1 are r1_gamma
    alone, and a step priced 0 contributes nothing."""
    from ddaebm.fastpath import objectives

    energy, _, _, b = _setup()
    x = b.x_k.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad((energy(x, b.k) + log_transition(SCHEDULE, x, b.x_k1, b.k)).sum(), x)
    gammas = torch.tensor([0.3, 0.0, 0.02, 0.1])
    loss = objectives.energy_loss if fused else energy_loss
    _, uniform = loss(energy, SCHEDULE, b, LossConfig(r1_gamma=0.3, r1_gamma_scale=[1.0] * 4))
    _, scalar = loss(energy, SCHEDULE, b, LossConfig(r1_gamma=0.3))
    _, steps = loss(energy, SCHEDULE, b, LossConfig(r1_gamma=0.1, r1_gamma_scale=(gammas / 0.1).tolist()))
    _, off = loss(energy, SCHEDULE, b, LossConfig(r1_gamma=0.3, r1_gamma_scale=[0.0] * 4))
    assert uniform["r1"].item() == pytest.approx(scalar["r1"].item(), rel=1e-5)
    expected = (0.5 * gammas[b.k] * g.pow(2).sum(1)).mean()
    assert steps["r1"].item() == pytest.approx(expected.item(), rel=1e-5)
    constant = 0.5 * 2 * (gammas[b.k] * SCHEDULE.a[b.k + 1] ** 2 / SCHEDULE.beta[b.k + 1]).mean()
    assert (steps["r1"] - steps["r1_excess"]).item() == pytest.approx(constant.item(), rel=1e-5)
    assert "r1" not in off  # every step priced 0: no penalty at all


def test_energy_loss_fake_weight_and_terms():
    energy, _, _, b = _setup()
    f_real = energy(b.x_k, b.k).mean().item()
    f_fake = energy(b.x_fake.detach(), b.k).mean().item()
    loss, stats = energy_loss(energy, SCHEDULE, b, LossConfig(r1_gamma=0.0, fake_weight=0.1))
    assert loss.item() == pytest.approx(-f_real + 0.1 * f_fake, rel=1e-5, abs=1e-6)
    assert "r1" not in stats
    loss.backward()
    assert all(p.grad is not None for p in energy.parameters())


def test_energy_loss_does_not_reach_generator():
    energy, gen_enc, _, b = _setup()
    loss, _ = energy_loss(energy, SCHEDULE, b, LossConfig())
    loss.backward()
    assert all(p.grad is None for p in gen_enc.parameters())


EXPECTED_TERMS = {
    "full": {"E_F", "L_lat", "L_rec", "L_KL"},
    "no_latent": {"E_F", "L_rec"},
    "kl_only": {"E_F", "L_lat"},
    "kl_no_entropy": {"E_F"},
}


@pytest.mark.parametrize("ablation", EXPECTED_TERMS)
def test_ablation_terms(ablation):
    energy, gen_enc, terms, b = _setup(ablation)
    energy.requires_grad_(False)
    loss, stats = generator_loss(energy, gen_enc, SCHEDULE, b, LossConfig(), terms)
    assert set(stats) - {"loss_gen"} == EXPECTED_TERMS[ablation]
    # The loss is exactly the sum of its logged terms: −E_F + L_lat + L_rec + L_KL.
    total = -stats["E_F"] + sum(stats[k] for k in ("L_lat", "L_rec", "L_KL") if k in stats)
    assert loss.item() == pytest.approx(total.item(), rel=1e-5)
    assert (gen_enc.encoder is None) == (not terms.encoder)
    if not terms.latent:
        assert torch.all(b.z == 0)
    loss.backward()
    assert all(p.grad is None for p in energy.parameters())
    assert any(p.grad is not None for p in gen_enc.generator.parameters())


def test_entropy_and_kl_terms_match_their_formulas():
    energy, gen_enc, terms, b = _setup()
    energy.requires_grad_(False)
    cfg = LossConfig(lambda_ent=0.37, lambda_kl=1.0)
    _, stats = generator_loss(energy, gen_enc, SCHEDULE, b, cfg, terms)
    mu_g, lv_g = gen_enc.encoder(b.x_fake, b.x_k1, b.k)
    assert stats["L_lat"].item() == pytest.approx(0.37 * latent_nll(b.z, mu_g, lv_g).mean().item(), rel=1e-5)
    mu, lv = gen_enc.encoder(b.x_k.detach(), b.x_k1, b.k)
    assert stats["L_KL"].item() == pytest.approx(kl_to_standard_normal(mu, lv).mean().item(), rel=1e-5)


def test_recon_switches():
    energy, gen_enc, terms, b = _setup()
    energy.requires_grad_(False)
    rec = lambda cfg: generator_loss(energy, gen_enc, SCHEDULE, b, cfg, terms)[1]["L_rec"].item()  # noqa: E731
    base = rec(LossConfig())
    # w ≡ 1 at (1, 1); (α, β) = (0.6, 0.2) weights every k by w(t_{k+1}) ≤ 0.6 on this grid.
    assert rec(LossConfig(iw_alpha=0.6, iw_beta=0.2)) < base
    assert rec(LossConfig(lambda_rec=2.0)) == pytest.approx(2 * base, rel=1e-5)
    assert rec(LossConfig(recon_var_floor=1.0)) != pytest.approx(base)
    assert rec(LossConfig(recon_var_floor_step1=True)) != pytest.approx(base)
    mse = rec(LossConfig(recon_mode="mse_prior_z"))
    from ddaebm.diffusion.schedule import posterior_mean

    expected = ((b.x_k.detach() - posterior_mean(SCHEDULE, b.x0_fake, b.x_k1, b.k)) ** 2).sum(1).mean()
    assert mse == pytest.approx(expected.item(), rel=1e-5)


def test_mse_prior_z_gives_encoder_no_recon_gradient():
    """method.md §5 bug B7: in the official CIFAR recon, the encoder gets gradient only from KL and L_lat."""
    energy, gen_enc, _, b = _setup()
    energy.requires_grad_(False)
    terms = dataclasses.replace(ABLATIONS["full"], kl=False, entropy=False)
    loss, _ = generator_loss(energy, gen_enc, SCHEDULE, b, LossConfig(recon_mode="mse_prior_z"), terms)
    loss.backward()
    assert all(p.grad is None for p in gen_enc.encoder.parameters())
    energy2, gen_enc2, _, b2 = _setup()
    energy2.requires_grad_(False)
    loss2, _ = generator_loss(energy2, gen_enc2, SCHEDULE, b2, LossConfig(recon_mode="elbo_encoder"), terms)
    loss2.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gen_enc2.encoder.parameters())


def test_nce_recovers_a_known_density():
    """The NCE term's minimiser is f(·, 0) = log p_data + log(2π·std²) (the noise's dropped constant, d = 2):
    fitted to N(0, 0.5²I) data against N(0, 2²I) noise, f(x) = a − b‖x‖² comes out at b = 1/(2·0.5²) = 2 and
    a = log(2²/0.5²) = 2.77."""
    g = torch.Generator().manual_seed(0)
    rows, std = 40_000, 2.0
    data, noise = 0.5 * torch.randn(rows, 2, generator=g), std * torch.randn(rows, 2, generator=g)
    ab = torch.zeros(2, requires_grad=True)
    opt = torch.optim.LBFGS([ab], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        f = lambda x: ab[0] - ab[1] * x.pow(2).sum(1)  # noqa: E731
        loss = nce_value(nce_log_ratio(f(data), data, std), nce_log_ratio(f(noise), noise, std), rows, 1)
        loss.backward()
        return loss

    opt.step(closure)
    assert ab[1].item() == pytest.approx(2.0, rel=0.03)
    assert ab[0].item() == pytest.approx(torch.log(torch.tensor(16.0)).item(), abs=0.05)


def test_nce_term_adds_to_the_energy_loss_only_through_the_rows_at_step_zero():
    """loss.nce_weight adds λ·NCE on the k = 0 rows' real x_k and noise, normalised by rows/T; other rows' noise
    is never read."""
    energy, gen_enc, terms, _ = _setup()
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(3))
    b = draw_step_batch(x0, SCHEDULE, gen_enc.generator, terms, 2, torch.Generator().manual_seed(4), nce_std=1.5)
    base, _ = energy_loss(energy, SCHEDULE, b, LossConfig(r1_gamma=0.0))
    cfg = LossConfig(r1_gamma=0.0, nce_weight=0.7, nce_std=1.5)
    loss, stats = energy_loss(energy, SCHEDULE, b, cfg)
    zero = b.k == 0
    with torch.no_grad():
        x_d, x_n = b.x_k[zero], b.nce_noise[zero]
        h_d = energy(x_d, b.k[zero]) + x_d.pow(2).sum(1) / (2 * 1.5**2)
        h_n = energy(x_n, b.k[zero]) + x_n.pow(2).sum(1) / (2 * 1.5**2)
        expected = (torch.nn.functional.softplus(-h_d).sum() + torch.nn.functional.softplus(h_n).sum()) * 4 / 64
    assert 0 < zero.sum() < 64
    torch.testing.assert_close(stats["nce"], expected)
    torch.testing.assert_close(loss, base + 0.7 * expected)
    b.nce_noise[~zero] = float("nan")  # rows at k > 0: their noise is not used
    assert torch.isfinite(energy_loss(energy, SCHEDULE, b, cfg)[0])
    b.nce_noise = None
    with pytest.raises(ValueError, match="nce_std"):
        energy_loss(energy, SCHEDULE, b, cfg)
