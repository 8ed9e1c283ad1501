"""The toy fast path (ddaebm/fastpath/) against the generic autograd path it replaces (ddaebm/losses.py).

Same losses, same parameter gradients (R1's and the PReLU slopes' included) up to float32 rounding, at every
step k; and it steps aside for anything it was not written for.
"""

import copy
import dataclasses

import pytest
import torch

from ddaebm.config import DiffusionConfig, LossConfig, ModelConfig
from ddaebm.diffusion.schedule import build_schedule
from ddaebm import losses
from ddaebm.fastpath import cpu
from ddaebm.fastpath import layout as tl
from ddaebm.fastpath import objectives as fo
from ddaebm.fastpath import passes as tf
from ddaebm.losses import ABLATIONS, draw_step_batch, r1_gammas
from ddaebm.networks import build_energy, build_generator_encoder
from ddaebm.networks.precision import autocast_bf16

SCHEDULE = build_schedule(DiffusionConfig(variance="geometric", beta_min=1e-4, beta_max=0.9999))
TOL = dict(rtol=2e-4, atol=2e-5)


def _nets(seed=0):
    """Networks a little way into training: PReLU slopes and BatchNorm weights off their initial values."""
    torch.manual_seed(seed)
    energy, gen_enc = build_energy(ModelConfig()), build_generator_encoder(ModelConfig())
    with torch.no_grad():
        for p in [*energy.parameters(), *gen_enc.parameters()]:
            if p.numel() == 1 or p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return energy, gen_enc


def _batch(gen_enc, terms=ABLATIONS["full"], n=96, seed=1, k=None, fused=True):
    x0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    forward = fo.generator_forward if fused else losses.module_forward
    b = draw_step_batch(x0, SCHEDULE, gen_enc.generator, terms, 2, torch.Generator().manual_seed(seed + 1),
                        nce_std=1.5, forward=forward)
    if k is not None:  # every row at one step
        b.k = torch.full_like(b.k, k)
    return b


def _grads(module):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]


def _close(names, grads):
    """Each gradient within 1e-4 of its norm, plus float32 noise on the scale of the largest gradient: the biases
    just before a BatchNorm have an exactly zero gradient, which both paths compute as rounding noise."""
    fast, slow = grads
    scale = max(g.norm() for g in slow)
    for name, a, b in zip(names, fast, slow):
        err = (a - b).norm()
        assert err <= 1e-4 * b.norm() + 1e-6 * scale, f"{name}: |diff| {err:.3g}, |grad| {b.norm():.3g}"


def _energy_step(energy, gen_enc, b, cfg, fused, lazy=False):
    energy = copy.deepcopy(energy)
    impl = fo if fused else losses
    loss, stats = (impl.lazy_r1_loss if lazy else impl.energy_loss)(energy, SCHEDULE, b, cfg)
    loss.backward()
    return loss, stats, _grads(energy), [n for n, _ in energy.named_parameters()]


@pytest.mark.parametrize("k", [0, 1, 2, 3, None])
@pytest.mark.parametrize("cfg", [LossConfig(r1_gamma=0.3), LossConfig(r1_gamma=0.02, fake_weight=0.1),
                                 LossConfig(r1_gamma=0.3, r1_target="energy_only"), LossConfig(r1_gamma=0.0),
                                 LossConfig(r1_gamma=0.1, r1_gamma_scale=[3.0, 0.0, 0.2, 1.0]),
                                 LossConfig(r1_gamma=0.3, nce_weight=1.0, nce_std=1.5),
                                 LossConfig(r1_gamma=0.0, nce_weight=0.5, nce_std=1.5)])
def test_energy_loss_and_gradients_match_autograd(k, cfg):
    energy, gen_enc = _nets()
    assert tl.energy_supported(energy, torch.zeros(1, 2))
    b = _batch(gen_enc, k=k)
    loss, stats, grads, names = _energy_step(energy, gen_enc, b, cfg, fused=True)
    loss_ref, stats_ref, grads_ref, _ = _energy_step(energy, gen_enc, b, cfg, fused=False)
    assert set(stats) == set(stats_ref)
    for key in stats:
        torch.testing.assert_close(stats[key], stats_ref[key], **TOL)
    torch.testing.assert_close(loss, loss_ref, **TOL)
    _close(names, (grads, grads_ref))
    # The R1 term on its own moves every weight it touches, the PReLU slopes among them (where a row's γ > 0).
    if torch.as_tensor(r1_gammas(cfg, b.k)).max() > 0:
        r1_only = dataclasses.replace(cfg, fake_weight=0.0)
        _, _, g_fast, _ = _energy_step(energy, gen_enc, b, r1_only, fused=True)
        _, _, g_slow, _ = _energy_step(energy, gen_enc, b, dataclasses.replace(r1_only, r1_gamma=0.0), fused=True)
        r1_grads = {n: a - c for n, a, c in zip(names, g_fast, g_slow)}
        assert all(r1_grads[n].abs().sum() > 0 for n in ("head.0.weight", "head.2.weight", "input.pre.2.weight",
                                                         "head.1.weight", "head.3.weight", "input.first.weight"))


def test_lazy_r1_matches_autograd():
    energy, gen_enc = _nets()
    b = _batch(gen_enc)
    cfg = LossConfig(r1_gamma=0.3, r1_interval=4)
    loss, stats, grads, names = _energy_step(energy, gen_enc, b, cfg, fused=True, lazy=True)
    loss_ref, stats_ref, grads_ref, _ = _energy_step(energy, gen_enc, b, cfg, fused=False, lazy=True)
    torch.testing.assert_close(loss, loss_ref, **TOL)
    torch.testing.assert_close(stats["r1_lazy"], stats_ref["r1_lazy"], **TOL)
    _close(names, (grads, grads_ref))


def _generator_step(energy, gen_enc, terms, cfg, fused, k):
    energy, gen_enc = copy.deepcopy(energy), copy.deepcopy(gen_enc)
    energy.requires_grad_(False)
    impl = fo if fused else losses
    b = _batch(gen_enc, terms, k=None, fused=fused)
    if k is not None:  # redraw the fake at one k, the generator's graph kept
        b = dataclasses.replace(b, k=torch.full_like(b.k, k))
        b.x0_fake = (fo.generator_forward if fused else losses.module_forward)(gen_enc.generator, b.x_k1, b.k, b.z)
        from ddaebm.diffusion.schedule import posterior_sample

        b.x_fake = posterior_sample(SCHEDULE, b.x0_fake, b.x_k1, b.k, torch.randn_like(b.x_k1))
    loss, stats = impl.generator_loss(energy, gen_enc, SCHEDULE, b, cfg, terms)
    loss.backward()
    buffers = [t.clone() for t in gen_enc.buffers()]
    return loss, stats, _grads(gen_enc), buffers, [n for n, _ in gen_enc.named_parameters()]


@pytest.mark.parametrize("k", [0, 1, 2, 3, None])
@pytest.mark.parametrize("ablation", list(ABLATIONS))
def test_generator_loss_and_gradients_match_autograd(k, ablation):
    energy, gen_enc = _nets()
    terms, cfg = ABLATIONS[ablation], LossConfig(lambda_ent=0.1, recon_var_floor=0.01)
    torch.manual_seed(5)
    fast = _generator_step(energy, gen_enc, terms, cfg, True, k)
    torch.manual_seed(5)
    slow = _generator_step(energy, gen_enc, terms, cfg, False, k)
    torch.testing.assert_close(fast[0], slow[0], **TOL)
    for key in fast[1]:
        torch.testing.assert_close(fast[1][key], slow[1][key], **TOL)
    _close(fast[4], (fast[2], slow[2]))
    for a, b in zip(fast[3], slow[3]):  # BatchNorm running averages and counts
        torch.testing.assert_close(a, b, **TOL)


def test_generator_objective_runs_the_draw_pass_backward_only_for_its_own_fake():
    """objectives._draw_pass: the fused objective takes over the backward of the generator pass behind b.x_fake
    (test_generator_loss_and_gradients_match_autograd, k=None, checks the gradients) only while x_fake is the
    drawn one and the pass is this generator's; otherwise autograd backpropagates through x̃_k."""
    energy, gen_enc = _nets()
    energy.requires_grad_(False)
    b = _batch(gen_enc)
    cfg = LossConfig()
    assert fo.generator_supported(energy, gen_enc, b)
    g_sp = tl.spec(gen_enc.generator)
    assert fo._draw_pass(b, g_sp) is not None
    other = copy.deepcopy(gen_enc)
    assert fo.generator_supported(energy, other, b)
    assert fo._draw_pass(b, tl.spec(other.generator)) is None
    assert fo._draw_pass(dataclasses.replace(b, x_fake=b.x_fake * 1.0), g_sp) is None
    changed = _batch(other)
    with torch.no_grad():
        other.generator.net.decoder[2].weight.mul_(1.01)  # after the draw: autograd would refuse its backward
    assert fo._draw_pass(changed, tl.spec(other.generator)) is None
    loss, _ = fo.generator_loss(energy, gen_enc, SCHEDULE, b, cfg, ABLATIONS["full"])
    loss.backward()
    assert all(p.grad is not None for p in gen_enc.parameters())


@pytest.mark.parametrize("train", [True, False])
def test_conditional_mlp_matches_its_modules(train):
    _, gen_enc = _nets()
    for mlp, width in ((gen_enc.generator.net, 4), (gen_enc.encoder.body, 4)):
        mlp.train(train)
        x = torch.randn(50, width, requires_grad=True)
        k = torch.randint(0, 4, (50,))
        g_out = torch.randn(50, mlp.decoder[5].out_features)
        assert tl.mlp_supported(mlp, x)
        ref_mlp = copy.deepcopy(mlp)
        fast = tf.conditional_mlp(mlp, x, k)
        slow = ref_mlp.decoder(ref_mlp.input(x, k))
        torch.testing.assert_close(fast, slow, **TOL)
        params, ref_params = [x, *mlp.parameters()], [x, *ref_mlp.parameters()]
        names = ["input", *(name for name, _ in mlp.named_parameters())]
        # _close: the bias before each BatchNorm has an exactly zero gradient, rounding noise on both paths
        _close(names, (torch.autograd.grad((fast * g_out).sum(), params),
                       torch.autograd.grad((slow * g_out).sum(), ref_params)))
        for a, b in zip(mlp.buffers(), ref_mlp.buffers()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("groups", [1, 2])
def test_biases_ahead_of_a_training_batch_norm_get_exact_zero_gradients(groups):
    """A training-mode BatchNorm removes any per-column shift of its input, so the biases that add one (the
    Linear's before it, and post.b and step.net.2.b, which add the same vector to every row) have zero
    gradient: exact zeros in the fast path (autograd's are rounding noise), the others untouched; in eval mode
    they get their column sums."""
    _, gen_enc = _nets()
    mlp = gen_enc.encoder.body
    zero = {"input.pre.0.bias", "input.post.bias", "input.step.net.2.bias", "input.first.bias", "decoder.2.bias",
            "decoder.5.bias"}
    x, k, g = torch.randn(2 * 40, 4), torch.randint(0, 4, (2 * 40,)), torch.randn(2 * 40, 16)
    for train in (True, False):
        mlp.train(train)
        assert tl.mlp_supported(mlp, x)
        with torch.no_grad():
            _, cache = tf.mlp_forward(tl.spec(mlp), x, k, groups=groups)
            _, grads = tf.mlp_backward(tl.spec(mlp), cache, g, False)
        for (name, _), grad in zip(mlp.named_parameters(), grads):
            assert (name in zero and train) == (not grad.any()), name


@pytest.mark.parametrize("train", [True, False])
def test_interleaved_passes_match_separate_calls(train):
    """groups=2 (the encoder's two passes as one): rows interleaved, BatchNorm statistics per pass, running
    averages as two calls in turn would leave them, gradients as the sum over both passes."""
    _, gen_enc = _nets()
    mlp = gen_enc.encoder.body.train(train)
    ref = copy.deepcopy(mlp)
    a, b = torch.randn(40, 4, requires_grad=True), torch.randn(40, 4, requires_grad=True)
    ka, kb = torch.randint(0, 4, (40,)), torch.randint(0, 4, (40,))
    g_a, g_b = torch.randn(40, 16), torch.randn(40, 16)
    assert tl.mlp_supported(mlp, a)
    with torch.no_grad():
        out, cache = tf.mlp_forward(tl.spec(mlp), torch.stack([a, b], 1).view(80, 4),
                                           torch.stack([ka, kb], 1).view(80), groups=2)
        d_in, grads = tf.mlp_backward(tl.spec(mlp), cache, torch.stack([g_a, g_b], 1).view(80, 16),
                                             True)
    out_a, out_b = ref.decoder(ref.input(a, ka)), ref.decoder(ref.input(b, kb))
    torch.testing.assert_close(out[0::2], out_a, **TOL)
    torch.testing.assert_close(out[1::2], out_b, **TOL)
    ref_grads = torch.autograd.grad((out_a * g_a).sum() + (out_b * g_b).sum(), [a, b, *ref.parameters()])
    torch.testing.assert_close(d_in[0::2], ref_grads[0], **TOL)
    torch.testing.assert_close(d_in[1::2], ref_grads[1], **TOL)
    _close([name for name, _ in mlp.named_parameters()], (grads, ref_grads[2:]))
    for x, y in zip(mlp.buffers(), ref.buffers()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_energy_value_input_gradient():
    energy, _ = _nets()
    energy.requires_grad_(False)
    x = torch.randn(64, 2, requires_grad=True)
    k = torch.randint(0, 4, (64,))
    w = torch.randn(64)
    assert tl.energy_supported(energy, x)
    (g_fast,) = torch.autograd.grad((tf.energy_value(energy, x, k) * w).sum(), x)
    (g_slow,) = torch.autograd.grad((energy(x, k) * w).sum(), x)
    torch.testing.assert_close(g_fast, g_slow, **TOL)


@pytest.mark.parametrize("k", [0, None])
def test_base_measure_matches_autograd(k):
    """model.energy_base_std: f(x, 0) = net(x, 0) + log N(x; 0, s²I) in the fast path's values, R1 (its score
    joins ∇_x f), the generator's ∇_x f at x̃ and energy_value's gradient, as autograd through ToyEnergy.forward
    has them; the parameter gradients stay the network's. A changed base_std renews the cached spec."""
    energy, gen_enc = _nets()
    energy.base_std = 0.8
    b = _batch(gen_enc, k=k)
    cfg = LossConfig(r1_gamma=0.3, nce_weight=1.0, nce_std=0.8)
    fast, slow = (_energy_step(energy, gen_enc, b, cfg, fused=f) for f in (True, False))
    torch.testing.assert_close(fast[0], slow[0], **TOL)
    for key in fast[1]:
        torch.testing.assert_close(fast[1][key], slow[1][key], **TOL)
    _close(fast[3], (fast[2], slow[2]))
    terms, g_cfg = ABLATIONS["full"], LossConfig(lambda_ent=0.1, recon_var_floor=0.01)
    gen = []
    for fused in (True, False):
        torch.manual_seed(5)
        gen.append(_generator_step(energy, gen_enc, terms, g_cfg, fused, k))
    torch.testing.assert_close(gen[0][0], gen[1][0], **TOL)
    _close(gen[0][4], (gen[0][2], gen[1][2]))
    frozen = copy.deepcopy(energy).requires_grad_(False)
    x, ks = torch.randn(64, 2, requires_grad=True), torch.randint(0, 4, (64,))
    assert tl.energy_supported(frozen, x)
    (g_fast,) = torch.autograd.grad(tf.energy_value(frozen, x, ks).sum(), x)
    (g_slow,) = torch.autograd.grad(frozen(x, ks).sum(), x)
    torch.testing.assert_close(g_fast, g_slow, **TOL)
    frozen.base_std = 0.0
    assert tl.energy_supported(frozen, x) and tl.spec(frozen).base_std == 0.0


def test_fast_path_steps_aside():
    energy, gen_enc = _nets()
    x = torch.zeros(8, 2)
    # autocast (dist.precision=bf16) wraps the networks' forward: the generic path keeps its numerics.
    wrapped_e, wrapped_g = copy.deepcopy(energy), copy.deepcopy(gen_enc)
    autocast_bf16(wrapped_e)
    autocast_bf16(wrapped_g)
    assert not tl.energy_supported(wrapped_e, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not tl.mlp_supported(gen_enc.generator.net, torch.zeros(8, 4))
    # hooks, another dtype, a swapped layer, the switch
    hooked = copy.deepcopy(energy)
    hooked.head[1].register_forward_hook(lambda *a: None)
    assert not tl.energy_supported(hooked, x)
    assert not tl.energy_supported(copy.deepcopy(energy).double(), x)
    swapped = copy.deepcopy(energy)
    swapped.head[0] = torch.nn.PReLU()
    assert not tl.energy_supported(swapped, x)
    # a replaced parameter (no scalar ==: compared by identity) renews the cached spec
    renewed = copy.deepcopy(energy)
    assert tl.energy_supported(renewed, x)
    renewed.head[1].weight = torch.nn.Parameter(renewed.head[1].weight.detach() * 2)
    assert tl.energy_supported(renewed, x) and tl.spec(renewed).w2 is renewed.head[1].weight
    # after the spec was cached: a hook, then a parameter put straight into its module's dictionary
    late = copy.deepcopy(energy)
    assert tl.energy_supported(late, x)
    handle = late.head[1].register_forward_pre_hook(lambda *a: None)
    assert not tl.energy_supported(late, x)
    handle.remove()
    w2 = torch.nn.Parameter(late.head[1].weight.detach() * 2)
    late.head[1]._parameters["weight"] = w2
    assert tl.energy_supported(late, x) and tl.spec(late).w2 is w2
    assert tl.energy_supported(energy, x) and tl.mlp_supported(gen_enc.generator.net, torch.zeros(8, 4))
    # Other energies get the generic losses from the fast path's objectives (any energy(x, k) -> [B]).
    other = torch.nn.Sequential(torch.nn.Linear(2, 1))
    generic = lambda x, k: other(x).squeeze(1)  # noqa: E731
    b = _batch(gen_enc)
    loss, stats = fo.energy_loss(generic, SCHEDULE, b, LossConfig(r1_gamma=0.1))
    loss.backward()
    assert other[0].weight.grad is not None and "r1" in stats


def test_functional_call_takes_the_parameters_it_is_given():
    """torch.func.functional_call swaps tensors into the modules' dictionaries for one call: the fast path's
    cached spec must follow (the outputs are the module's with those parameters), and come back afterwards."""
    _, gen_enc = _nets()
    mlp = gen_enc.generator.net.eval()
    x, k = torch.randn(16, 4), torch.randint(0, 4, (16,))
    before = tf.conditional_mlp(mlp, x, k) if tl.mlp_supported(mlp, x) else None
    assert before is not None
    scaled = {name: p.detach() * 1.5 for name, p in mlp.named_parameters()}
    fused_call = lambda x, k: tf.conditional_mlp(mlp, x, k) if tl.mlp_supported(mlp, x) else mlp(x, k)  # noqa: E731
    with torch.nn.utils.stateless._reparametrize_module(mlp, scaled):
        swapped = fused_call(x, k)
    reference = copy.deepcopy(mlp)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(scaled[name])
    torch.testing.assert_close(swapped, reference(x, k), **TOL)
    torch.testing.assert_close(fused_call(x, k), before)


def test_double_backward_through_the_fused_generator_is_refused():
    _, gen_enc = _nets()
    x = torch.randn(16, 2, requires_grad=True)
    out = fo.generator_forward(gen_enc.generator, x, torch.zeros(16, dtype=torch.long), torch.randn(16, 2))
    (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def test_trainer_takes_the_fast_path_for_the_toy_arch():
    from ddaebm.config import load_config
    from ddaebm.training.trainer import Trainer
    from tests.conftest import CONFIGS

    t = Trainer(load_config(CONFIGS / "toy" / "25gaussians.yaml", ["model.hidden=32", "data.batch=32"]))
    t._train_only("generator")
    b = t._draw()
    assert type(b.x0_fake.grad_fn).__name__ == "_ConditionalMLPFunctionBackward"
    assert t.objectives.name == "toy fast path"
    t._train_only("energy")
    loss, _ = t.objectives.energy_loss(t.energy, t.schedule, b, t.cfg.loss)
    assert type(loss.grad_fn).__name__ == "_EnergyObjectiveBackward"
    t._train_only("generator")
    loss, _ = t.objectives.generator_loss(t.energy, t.gen_enc, t.schedule, b, t.cfg.loss, t.terms)
    assert type(loss.grad_fn).__name__ == "_GeneratorObjectiveBackward"
    t.train_step()


def test_hidden_products(monkeypatch):
    x, w, b = torch.randn(50, 300), torch.randn(300, 300), torch.randn(300)
    exact = x.double() @ w.double().t() + b.double()
    out = cpu.product(x, w, b)
    # IEEE float32 (errors ~1e-5 at this size), not a reduced-precision mode (bf16 would be off by ~0.1)
    assert out.dtype == torch.float32 and (out.double() - exact).abs().max() < 1e-3
    exact_t = x.double() @ w.double()  # a transposed view, as the backward passes it
    assert (cpu.product(x, w.t()).double() - exact_t).abs().max() < 1e-3
    calls = []

    def recorded(x, w, bias, *_):
        calls.append(tuple(w.shape))
        return torch.nn.functional.linear(x, w, bias)

    monkeypatch.setattr(cpu, "_linear_onednn", recorded)
    cpu.product(x, w)
    cpu.product(x, w[:16])  # 16 outputs: ATen
    assert torch.equal(cpu.product(x.double(), w.double()), x.double() @ w.double().t())  # float64: ATen
    assert calls == [(300, 300)]
    monkeypatch.undo()
    from bench.common import flops_of  # the bench counts oneDNN's products too (torch's registry does not)

    assert flops_of(lambda: cpu.product(x, w, b)) == 2 * 50 * 300 * 300
    if torch.backends.mkldnn.is_available():  # whichever backend this machine's CPU chose
        for backend in ("onednn", "aten"):
            monkeypatch.setattr(cpu, "_linear_onednn", cpu.onednn_linear(backend))
            assert flops_of(lambda: cpu.product(x, w, b)) == 2 * 50 * 300 * 300
            assert (cpu.product(x, w, b).double() - exact).abs().max() < 1e-3


def test_hidden_product_backend_choice():
    """oneDNN for the hidden products except on Intel CPUs (MKL), or as train.fast_products says; a bad value is
    refused by name."""
    choose = cpu.onednn_linear
    assert choose("auto", "GenuineIntel") is None and choose("aten", "AuthenticAMD") is None
    if torch.backends.mkldnn.is_available():
        onednn = torch.ops.mkldnn._linear_pointwise.default
        assert choose("auto", "AuthenticAMD") is onednn and choose("onednn", "GenuineIntel") is onednn
        assert choose("auto", "") is onednn
        x, w = torch.randn(20, 300), torch.randn(300, 300)
        assert (onednn(x, w, None, "none", [], "") - x @ w.t()).abs().max() < 1e-3
    with pytest.raises(ValueError, match="train.fast_products='mkl'"):
        choose("mkl")
