"""The energy and generator objectives: each switch and ablation changes exactly the terms it names (SPEC §5-§6)."""

import dataclasses

import pytest
import torch
from torch import nn

from ddaebm.config import DiffusionConfig, LossConfig, ModelConfig
from ddaebm.diffusion.schedule import build_schedule, log_transition
from ddaebm.losses import (ABLATIONS, draw_step_batch, energy_loss, generator_loss, kl_to_standard_normal,
                           latent_nll, r1_expected_constant)
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
    """With f ≡ 0 the full-conditional penalty averages to (γ/2)·d·a²/σ² (SPEC §5, §13), ±3%.

    SPEC §13 asks for 1e4 samples; its k = 0 terms are χ²₂-distributed, so 1e4 leaves a 2% standard error:
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


def test_r1_penalty_matches_autograd_of_full_conditional():
    energy, _, _, b = _setup()
    cfg = LossConfig(r1_gamma=0.3)
    _, stats = energy_loss(energy, SCHEDULE, b, cfg)
    x = b.x_k.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad((energy(x, b.k) + log_transition(SCHEDULE, x, b.x_k1, b.k)).sum(), x)
    assert stats["r1"].item() == pytest.approx((0.15 * g.pow(2).sum(1).mean()).item(), rel=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_r1_gamma_per_step(fused):
    """loss.r1_gamma_steps prices each row's penalty at the γ of its step k: a list of one value is r1_gamma,
    and a step priced 0 contributes nothing."""
    from ddaebm.networks import toy_fused

    energy, _, _, b = _setup()
    x = b.x_k.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad((energy(x, b.k) + log_transition(SCHEDULE, x, b.x_k1, b.k)).sum(), x)
    gammas = torch.tensor([0.3, 0.0, 0.02, 0.1])
    with (torch.enable_grad() if fused else toy_fused.disabled()):
        _, uniform = energy_loss(energy, SCHEDULE, b, LossConfig(r1_gamma=0.0, r1_gamma_steps=[0.3] * 4))
        _, scalar = energy_loss(energy, SCHEDULE, b, LossConfig(r1_gamma=0.3))
        _, steps = energy_loss(energy, SCHEDULE, b, LossConfig(r1_gamma_steps=gammas.tolist()))
    assert uniform["r1"].item() == pytest.approx(scalar["r1"].item(), rel=1e-5)
    expected = (0.5 * gammas[b.k] * g.pow(2).sum(1)).mean()
    assert steps["r1"].item() == pytest.approx(expected.item(), rel=1e-5)
    constant = 0.5 * 2 * (gammas[b.k] * SCHEDULE.a[b.k + 1] ** 2 / SCHEDULE.beta[b.k + 1]).mean()
    assert (steps["r1"] - steps["r1_excess"]).item() == pytest.approx(constant.item(), rel=1e-5)


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
    """SPEC §5 bug B7: in the official CIFAR recon, the encoder gets gradient only from KL and L_lat."""
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
