"""The toy fast path's objectives: losses.py's energy and generator objectives for the toy MLPs, each one autograd
node with its gradients written out.

Same values as losses.energy_loss and losses.generator_loss (they call the same helpers), same gradients up to
float32 rounding (tests/test_toy_fused.py). Each checks at every call that the networks are still the layouts
written for here (ddaebm/fastpath/layout.py) and otherwise calls the generic objective; which loss switches they
cover is decided once, before training, by ddaebm/fastpath/__init__.py.

The energy step's R1 gradient in closed form. The toy energy is piecewise linear in x (PReLU): with u = A x + c,
h0 = M·prelu(u) + (per-k rows), h1 = W2·prelu(h0) + b2, f = w3·prelu(h1) + b3 and s the PReLU slopes (1 where
the input is > 0, the learned slope a elsewhere), its input gradient is the chain

    e2 = s2 ⊙ w3,  d2 = W2ᵀe2,  e1 = s1 ⊙ d2,  d1 = Mᵀe1,  e0 = s0 ⊙ d1,  ∇_x f = Aᵀe0,

whose slope masks are constant almost everywhere (autograd's double backward treats them so too). The e's are
∂f/∂(pre-activations) and the d's ∂f/∂(activations), so the same chain gives the ordinary gradients of
Σ_b ω_b f_b; and R1 = c·mean‖∇_x f + score‖² backpropagates through the chain with three more products.
The two contributions to each weight share one product, e.g. ∂/∂W2 = e2ᵀ(ω ⊙ prelu(h0) + ∂R1/∂d2); real and
fake samples share one pass of 2B rows, only the real ones carrying R1.
"""

from __future__ import annotations

import operator

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ddaebm import losses
from ddaebm.config import LossConfig
from ddaebm.diffusion.schedule import Schedule, importance_weight, log_transition, posterior_mean, transition_score
from ddaebm.fastpath import layout as tl
from ddaebm.fastpath import passes as tf
from ddaebm.losses import (ABLATIONS, StepBatch, Terms, _gaussian_nll, kl_to_standard_normal, latent_nll, nce_log_ratio,
                           nce_rows, nce_value, r1_enabled, r1_expected_constant, r1_gammas, recon_variance)
from ddaebm.networks.toy import BRANCH


# ---- the energy step


class _EnergyObjective(torch.autograd.Function):
    """loss = −w_real·mean f(real) + w_fake·mean f(fake) + c·mean‖∇_x f(real) + score‖² [+ λ·NCE], parameter
    gradients only.

    x holds the real rows, then the fake ones, then the NCE noise rows (nce: (λ, indices of the real rows at
    k = 0, noise std, rows for the normalisation, T), or None); w_real is 1 (energy_loss) or 0 (lazy R1 alone).
    Returns (loss, f, R1, NCE), the last three for the logs.
    """

    @staticmethod
    def forward(ctx, sp, x, k, n_real, n_fake, real_weight, fake_weight, r1_coef, score, nce, *params):
        f, c = tf.energy_forward(sp, x, k)
        tf.input_gradient_chain(sp, c)
        loss = -f[:n_real].mean() if real_weight else None
        if n_fake:
            fake = fake_weight * f[n_real:n_real + n_fake].mean()
            loss = fake if loss is None else loss + fake
        r1 = f.new_zeros(())
        r1_on = torch.is_tensor(r1_coef) or r1_coef != 0  # r1_coef: a number, or one per real row
        if r1_on:
            grad = tf.input_gradient(sp, c, n_real)
            c["r"] = grad if score is None else grad + score
            sq = c["r"].pow(2).sum(1)
            r1 = (r1_coef * sq).mean() if torch.is_tensor(r1_coef) else r1_coef * sq.mean()
            loss = r1.clone() if loss is None else loss + r1
        nce_loss, ctx.nce = f.new_zeros(()), None
        if nce is not None:  # ∂NCE/∂h = −σ(−h) at the data, σ(h) at the noise
            weight, idx, std, rows, steps = nce
            noise = slice(n_real + n_fake, None)
            h_d, h_n = nce_log_ratio(f[idx], x[idx], std), nce_log_ratio(f[noise], x[noise], std)
            nce_loss = nce_value(h_d, h_n, rows, steps)
            loss = loss + weight * nce_loss
            scale = weight * steps / rows
            ctx.nce = (idx, -scale * torch.sigmoid(-h_d), scale * torch.sigmoid(h_n))
        ctx.sp, ctx.cache, ctx.n_real, ctx.n_fake, ctx.r1_coef, ctx.r1_on = sp, c, n_real, n_fake, r1_coef, r1_on
        ctx.weights = (real_weight, fake_weight)
        ctx.mark_non_differentiable(f, r1, nce_loss)
        ctx.set_materialize_grads(False)  # f, R1 and NCE are for the logs: no zero-filled gradients for them
        return loss, f, r1, nce_loss

    @staticmethod
    @once_differentiable
    def backward(ctx, g_loss, _g_f, _g_r1, _g_nce):
        if g_loss is None:
            return (None,) * (10 + len(ctx.needs_input_grad[10:]))
        sp, c, nr, nf = ctx.sp, ctx.cache, ctx.n_real, ctx.n_fake
        x = c["x"]
        real_weight, fake_weight = ctx.weights
        omega = torch.cat([(-real_weight / nr * g_loss).expand(nr),
                           (fake_weight / max(nf, 1) * g_loss).expand(nf)]).to(x.dtype)  # ∂loss/∂f_b
        if ctx.nce is not None:
            idx, d_data, d_noise = ctx.nce
            omega = torch.cat([omega.index_add_(0, idx, d_data * g_loss), d_noise * g_loss])
        w3, col = sp.w3[0], omega[:, None]
        d1, d2, e0, e1, e2 = c["d1"], c["d2"], c["e0"], c["e1"], c["e2"]
        # The terms Σ ω_b f_b: each weight's gradient is (chain)ᵀ(ω ⊙ the layer's input).
        q_w2, q_first, q_a = c["v1"] * col, c["x20"] * col, x * col
        d_w3 = c["v2"].t() @ omega
        d_a2 = omega.dot(c["h1"].clamp_max(0) @ w3)
        d_a1 = omega.dot((d2 * c["h0"].clamp_max(0)).sum(1))
        d_a0 = omega.dot((d1 * c["u"].clamp_max(0)).sum(1))
        if ctx.r1_on:  # R1 backpropagated through the chain, real rows only
            coef = ctx.r1_coef[:, None] if torch.is_tensor(ctx.r1_coef) else ctx.r1_coef
            rho = c["r"] * (2 * coef / nr * g_loss)  # ∂R1/∂∇_x f
            de0 = rho @ sp.a.t()
            dd1 = de0 * c["s0"][:nr]
            de1 = dd1 @ c["fl"]["wc"][:, :BRANCH].t()
            dd2 = de1 * c["s1"][:nr]
            de2 = tf.product(dd2, sp.w2)
            q_w2[:nr] += dd2
            q_first[:nr, :BRANCH] += dd1
            q_a[:nr] += rho
            d_w3 = d_w3 + (de2 * c["s2"][:nr]).sum(0)
            d_a2 = d_a2 + tf.masked(de2, c["h1"][:nr]).sum(0).dot(w3)
            d_a1 = d_a1 + tf.masked(de1, c["h0"][:nr]).view(-1).dot(d2[:nr].reshape(-1))
            d_a0 = d_a0 + tf.masked(de0, c["u"][:nr]).view(-1).dot(d1[:nr].reshape(-1))
        first = tf.first_layer_grads(sp, c["fl"], tf.t_product(e1, q_first), e1.t() @ omega)
        grads = [e0.t() @ q_a, e0.t() @ omega, d_a0.view(1), *first, d_a1.view(1), e2.t() @ q_w2, e2.t() @ omega,
                 d_a2.view(1), d_w3[None], omega.sum().view(1)]
        grads = [g if need else None for g, need in zip(grads, ctx.needs_input_grad[10:])]
        return (None,) * 10 + tuple(grads)


def energy_objective(energy: nn.Module, x: torch.Tensor, k: torch.Tensor, n_real: int, n_fake: int,
                     real_weight: float, fake_weight: float, r1_coef: float | torch.Tensor,
                     score: torch.Tensor | None, nce: tuple | None = None):
    """(loss, f [rows], R1, NCE) of the energy step for x = [real; fake; NCE noise] rows; `loss.backward()`
    reaches θ only. After tl.energy_supported(energy, ...)."""
    sp = tl.spec(energy)
    return _EnergyObjective.apply(sp, x, k, n_real, n_fake, real_weight, fake_weight, r1_coef, score, nce,
                                  *sp.params)


def energy_loss(energy: nn.Module, s: Schedule, b: StepBatch, cfg: LossConfig, with_r1: bool = True,
                r1_scale: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """losses.energy_loss, for the toy energy in one node; b.x_k gets no gradient (nothing reads it)."""
    if not tl.energy_supported(energy, b.x_k):
        return losses.energy_loss(energy, s, b, cfg, with_r1, r1_scale)
    n = b.x_k.shape[0]
    r1_on = with_r1 and r1_enabled(cfg)
    score = None
    if r1_on and cfg.r1_target == "full_conditional":
        score = transition_score(s, b.x_k.detach(), b.x_k1, b.k)
    rows, steps, nce = [b.x_k.detach(), b.x_fake.detach()], [b.k, b.k], None
    if cfg.nce_weight > 0:  # the noise rows at k = 0 join the same pass
        idx = nce_rows(b)
        rows.append(b.nce_noise[idx])
        steps.append(b.k[idx])
        nce = (cfg.nce_weight, idx, cfg.nce_std, n, s.num_steps)
    loss, f, r1, nce_loss = energy_objective(energy, torch.cat(rows), torch.cat(steps), n, n, 1.0, cfg.fake_weight,
                                             0.5 * r1_gammas(cfg, b.k) * r1_scale if r1_on else 0.0, score, nce)
    stats = {"f_real": f[:n].mean(), "f_fake": f[n:2 * n].mean()}
    if r1_on:
        stats["r1"] = r1
        if cfg.r1_target == "full_conditional":
            constant = r1_expected_constant(s, b.k, b.x_k[0].numel(), r1_gammas(cfg, b.k))
            stats["r1_excess"] = r1 - r1_scale * constant
    if nce is not None:
        stats["nce"] = nce_loss
    stats["loss_energy"] = loss.detach()
    return loss, stats


def lazy_r1_loss(energy: nn.Module, s: Schedule, b: StepBatch, cfg: LossConfig) -> tuple[torch.Tensor, dict]:
    """losses.lazy_r1_loss, for the toy energy in one node."""
    if not tl.energy_supported(energy, b.x_k):
        return losses.lazy_r1_loss(energy, s, b, cfg)
    score = transition_score(s, b.x_k.detach(), b.x_k1, b.k) if cfg.r1_target == "full_conditional" else None
    r1, _, _, _ = energy_objective(energy, b.x_k.detach(), b.k, b.x_k.shape[0], 0, 0.0, 0.0,
                                   0.5 * r1_gammas(cfg, b.k) * float(cfg.r1_interval), score)
    return r1, {"r1_lazy": r1.detach()}


# ---- the generator + encoder step (the full objective, method.md §5)


def generator_supported(energy: nn.Module, gen_enc: nn.Module, b: StepBatch) -> bool:
    """Whether generator_loss below computes losses.generator_loss (for the loss switches that
    ddaebm/fastpath/__init__.py admits): the toy networks as written, the energy frozen, more than one row."""
    if not (b.x_k.shape[0] > 1 and tl.energy_supported(energy, b.x_fake)):
        return False
    gen, enc = getattr(gen_enc, "generator", None), getattr(gen_enc, "encoder", None)
    return (not any(p.requires_grad for p in tl.spec(energy).params)
            and tl.supported_spec(gen, tl.generator_layout, tl.generator_spec, b.x_fake) is not None
            and tl.supported_spec(enc, tl.encoder_layout, tl.encoder_spec, b.x_fake) is not None)


def _draw_pass(b: StepBatch, g_sp) -> tuple | None:
    """(the generator's fused pass that made b.x0_fake, ∂x̃_k/∂x0_fake per row) when the objective can run that
    pass's backward itself and reuse its first layer: b.x_fake is still the posterior sample draw_step_batch made
    from b.x0_fake, which this generator's fast path computed with the parameters as they are now (the same
    tensors, unchanged in place since, requires_grad alike), and no gradient is wanted for its inputs; else None
    (autograd then backpropagates through x̃_k's graph)."""
    link, node = b.fake_link, b.x0_fake.grad_fn
    if (link is None or link[0] is not b.x_fake or type(node) is not tf._ConditionalMLPFunction._backward_cls
            or len(node.sp.params) != len(g_sp.params) or not all(map(operator.is_, node.sp.params, g_sp.params))
            or node.versions != tf.versions(g_sp.params) or node.needs_input_grad[1]
            or node.needs_input_grad[3:] != tuple(p.requires_grad for p in g_sp.params)):
        return None
    return node, link[1]


class _GeneratorObjective(torch.autograd.Function):
    """L_G = −E_F + L_lat + L_rec + L_KL with gradients to the generator's and encoder's parameters, and to x̃_k.

    The encoder's two passes (on x̃_k and on x_k) are one pass of 2B interleaved rows (even: x̃_k, odd: x_k)
    with the BatchNorm statistics of each pass. `draw` (_draw_pass): x̃_k comes detached and the backward runs
    the generator's draw pass too, adding its gradients to the reconstruction pass's, the sum autograd would
    form (one node and one accumulation per parameter fewer); without it, ∂/∂x̃_k goes back through autograd."""

    @staticmethod
    def forward(ctx, s, cfg, e_sp, g_sp, q_sp, draw, x_fake, x_k, x_k1, z, eps, k, *params):
        n = x_fake.shape[0]
        f, ec = tf.energy_forward(e_sp, x_fake, k)
        e_f = (f + log_transition(s, x_fake, x_k1, k)).mean()
        enc_in = torch.stack([torch.cat([x_fake, x_k1], 1), torch.cat([x_k, x_k1], 1)], 1).view(2 * n, -1)
        h, enc_cache = tf.mlp_forward(q_sp, enc_in, k.repeat_interleave(2), groups=2)
        mu_all = torch.nn.functional.linear(h, q_sp.mu_w, q_sp.mu_b)
        raw = torch.nn.functional.linear(h, q_sp.lv_w, q_sp.lv_b)
        lv_all = raw.clamp(*q_sp.lv_range)
        mu_g, mu, lv_g, lv = mu_all[0::2], mu_all[1::2], lv_all[0::2], lv_all[1::2]
        l_lat = cfg.lambda_ent * latent_nll(z, mu_g, lv_g).mean()
        std = torch.exp(0.5 * lv)
        x0_e, gen_cache = tf.mlp_forward(g_sp, torch.cat([x_k1, mu + std * eps], 1), k,
                                         fl=None if draw is None else draw[0].cache["fl"])
        mean = posterior_mean(s, x0_e, x_k1, k)
        var, w = recon_variance(s, k, cfg), importance_weight(s.t[k + 1], cfg.iw_alpha, cfg.iw_beta)
        l_rec = cfg.lambda_rec * (w * _gaussian_nll(x_k, mean, var)).mean()
        l_kl = cfg.lambda_kl * kl_to_standard_normal(mu, lv).mean()
        loss = -e_f + l_lat + l_rec + l_kl
        ctx.sps, ctx.s, ctx.cfg, ctx.draw = (e_sp, g_sp, q_sp), s, cfg, draw
        ctx.cache = dict(ec=ec, x_fake=x_fake, x_k=x_k, x_k1=x_k1, z=z, eps=eps, k=k, h=h, enc=enc_cache, raw=raw,
                         mu_all=mu_all, lv_all=lv_all, std=std, gen=gen_cache, mean=mean, var=var, w=w)
        terms = (e_f, l_lat, l_rec, l_kl)
        ctx.mark_non_differentiable(*terms)
        ctx.set_materialize_grads(False)  # the terms are for the logs
        return loss, *terms

    @staticmethod
    @once_differentiable
    def backward(ctx, g_loss, *_):
        if g_loss is None:
            return (None,) * len(ctx.needs_input_grad)
        (e_sp, g_sp, q_sp), s, cfg, c = ctx.sps, ctx.s, ctx.cfg, ctx.cache
        x_fake, k, n = c["x_fake"], c["k"], c["x_fake"].shape[0]
        m = g_loss / n
        # −E_F: ∇ of f and of log N(x_{k+1}; a x̃, σ²) at x̃
        tf.input_gradient_chain(e_sp, c["ec"])
        d_fake = (tf.input_gradient(e_sp, c["ec"]) + transition_score(s, x_fake, c["x_k1"], k)) * -m
        # L_rec through the generator's pass on z_E = μ + e^{logvar/2}·ε
        d_mean = (m * cfg.lambda_rec) * (c["w"] / c["var"])[:, None] * (c["mean"] - c["x_k"])
        d_gen_in, gen_grads = tf.mlp_backward(g_sp, c["gen"], s.post_c1[k][:, None] * d_mean, True)
        d_z = d_gen_in[:, c["x_k1"].shape[1]:]
        # the heads: (μ, logvar) of x̃_k (L_lat), then of x_k (L_rec, L_KL)
        mu_g, mu, lv_g, lv = c["mu_all"][0::2], c["mu_all"][1::2], c["lv_all"][0::2], c["lv_all"][1::2]
        ev_g = torch.exp(lv_g)
        den = 1e-6 + ev_g
        d_mu = torch.stack([(m * cfg.lambda_ent) * (mu_g - c["z"]) / den, d_z + (m * cfg.lambda_kl) * mu], 1)
        d_lv = torch.stack([(m * cfg.lambda_ent) * (0.5 - 0.5 * (c["z"] - mu_g) ** 2 * ev_g / den ** 2),
                            d_z * 0.5 * c["std"] * c["eps"] + (m * cfg.lambda_kl) * 0.5 * (torch.exp(lv) - 1)], 1)
        d_mu, d_lv = d_mu.view(2 * n, -1), d_lv.view(2 * n, -1)  # the encoder's interleaved rows
        lo, hi = q_sp.lv_range
        d_lv = d_lv * ((c["raw"] >= lo) & (c["raw"] <= hi))  # clamp's backward
        d_h = d_mu @ q_sp.mu_w + d_lv @ q_sp.lv_w
        want_fake = ctx.needs_input_grad[6] or ctx.draw is not None
        d_enc_in, enc_grads = tf.mlp_backward(q_sp, c["enc"], d_h, want_fake)
        heads = [d_mu.t() @ c["h"], d_mu.sum(0), d_lv.t() @ c["h"], d_lv.sum(0)]
        if want_fake:
            d_fake = d_fake + d_enc_in[0::2, :x_fake.shape[1]]
        if ctx.draw is not None:  # x̃_k = c1·x0_fake + (terms without x0_fake), x0_fake the draw pass's output
            node, coef = ctx.draw
            _, draw_grads = tf.mlp_backward(g_sp, node.cache, coef[:, None] * d_fake, False)
            torch._foreach_add_(gen_grads, draw_grads)
        grads = [g if need else None for g, need in zip([*gen_grads, *enc_grads, *heads], ctx.needs_input_grad[12:])]
        return (None,) * 6 + (d_fake if ctx.needs_input_grad[6] else None,) + (None,) * 5 + tuple(grads)


def generator_loss(energy: nn.Module, gen_enc: nn.Module, s: Schedule, b: StepBatch, cfg: LossConfig,
                   terms: Terms) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """losses.generator_loss with every term on, in one node where generator_supported holds (the generic
    objective for the other ablations and recon modes, which select() keeps off the fast path anyway)."""
    if terms != ABLATIONS["full"] or cfg.recon_mode != "elbo_encoder" or not generator_supported(energy, gen_enc, b):
        return losses.generator_loss(energy, gen_enc, s, b, cfg, terms)
    g_sp, q_sp = tl.spec(gen_enc.generator), tl.spec(gen_enc.encoder)
    draw = _draw_pass(b, g_sp)
    loss, e_f, l_lat, l_rec, l_kl = _GeneratorObjective.apply(
        s, cfg, tl.spec(energy), g_sp, q_sp, draw, b.x_fake if draw is None else b.x_fake.detach(), b.x_k.detach(),
        b.x_k1, b.z, b.enc_noise, b.k, *g_sp.params, *q_sp.params)
    stats = {"E_F": e_f, "L_lat": l_lat, "L_rec": l_rec, "L_KL": l_kl, "loss_gen": loss.detach()}
    return loss, stats


def generator_forward(generator: nn.Module, x_k1: torch.Tensor, k: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """G(x_{k+1}, k, z) for the draw of a StepBatch: the toy generator's body as one node (whose backward
    generator_loss can run itself, _draw_pass), the module's own forward otherwise."""
    inputs = torch.cat([x_k1, z], dim=1)
    if type(generator) is tl.ToyGenerator and tl.mlp_supported(generator.net, inputs):
        return tf.conditional_mlp(generator.net, inputs, k)
    return generator(x_k1, k, z)
