"""Hand-written passes of the toy MLPs (ddaebm/networks/toy.py): the same functions in far fewer operations.

A toy iteration on one CPU core costs more in per-operation overhead and memory traffic than in arithmetic:
autograd records thousands of small operations per iteration. Here a network's forward is a plain function that
keeps what its backward needs, and its backward is written out:

- the opening layer (`BranchedInput`) is one product: with X = [pre(x) | onehot(k)] (16 + T columns) and
  C = [[W_post, b_post·1ᵀ], [0, emb(all k)ᵀ]] (64 × (16 + T)), BranchedInput(x, k) = b_first + X·(W_first·C)ᵀ.
  Its backward is three products: G = ∂h0ᵀ·X, ∂W_first = G·Cᵀ, ∂C = W_firstᵀ·G;
- BatchNorm runs through ATen's own kernels (batch statistics and running averages as nn.BatchNorm1d's), per
  group of rows: passes of one network with the same weights (the encoder's two) share their matrix products
  and keep separate statistics, as separate calls would. Their rows interleave (row g + G·r is row r of pass g),
  so that one BatchNorm call over the rows viewed as [r, G·C] serves all passes;
- `conditional_mlp` (generator and encoder bodies) and `energy_value` wrap these as single autograd nodes.

They read a module's tensors from its spec (ddaebm/fastpath/layout.py), valid only after the module's
`*_supported` check. ddaebm/fastpath/objectives.py builds the two training objectives from them; the generic
autograd path stays the definition they are tested against (tests/test_toy_fused.py).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ddaebm.fastpath.cpu import product, t_product
from ddaebm.fastpath.layout import spec
from ddaebm.networks.toy import BRANCH, FEATURES, ToyEnergy, _ConditionalMLP, base_log_density, base_score

_threshold_backward = torch.ops.aten.threshold_backward
_bn_backward = torch.ops.aten.native_batch_norm_backward


# ---- PReLU and BatchNorm


def slope(h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """PReLU's derivative: 1 where h > 0, a elsewhere ((1 − a) + a is exactly 1 for a in (−1, 2])."""
    return _threshold_backward((1 - a).expand_as(h), h, 0.0).add_(a)


def masked(g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """g where h ≤ 0, else 0: the part of g that multiplies a PReLU's learned slope."""
    return g - _threshold_backward(g, h, 0.0)


def prelu_backward(g: torch.Tensor, h: torch.Tensor, a: torch.Tensor,
                   overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂/∂h, ∂/∂a) of Σ g·prelu(h, a), as layers._PReLUFunction's backward computes them; `overwrite`: g is a
    temporary of the caller's, reused in place (one fresh tensor instead of three)."""
    g_pos = _threshold_backward(g, h, 0.0)
    g_neg = g.sub_(g_pos) if overwrite else g - g_pos
    return g_pos.addcmul_(g_neg, a), torch.dot(g_neg.view(-1), h.view(-1)).view(1)


def _linear_batch_norm(bn: SimpleNamespace | None, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                       groups: int):
    """(h, BatchNorm1d(h), saved statistics) for h = x·wᵀ + b, BatchNorm run per group of rows (`groups`
    interleaved passes; running averages updated in training), or (h, h, None) without a BatchNorm.

    In training the batch's own mean removes b from the output: h is then x·wᵀ, b goes into the running mean
    alone (the same update as with b in h), and the product skips addmm's pass that writes b into every row.
    The returned h is what the BatchNorm backward is to be given; b's gradient is its column sum either way."""
    if bn is None or not bn.m.training:
        h = product(x, w, b)
        return (h, h, None) if bn is None else (h, *_batch_norm_forward(bn, h, groups))
    h = product(x, w)
    out, saved = _batch_norm_forward(bn, h, groups, shift=b)
    return h, out, saved


def _batch_norm_forward(bn: SimpleNamespace, h: torch.Tensor, groups: int, shift: torch.Tensor | None = None):
    """nn.BatchNorm1d's forward on h + shift per group of rows, as `groups` calls in turn would run it (running
    averages updated in training, group 0 first); a training-mode `shift` only moves the running mean. Returns
    the output and what the backward needs: the batch statistics, `groups`, the (weight, running mean, running
    variance) the call read, repeated per group, and whether it normalised by the batch's statistics.

    Groups interleave: row g + groups·r is row r of group g, so h viewed as [rows, groups·C] gives each (group,
    channel) a column of its own and one ATen call normalises every group (the module docstring)."""
    m = bn.m
    if groups == 1:
        if m.training:
            bn.n.add_(1)
        out, mean, invstd = torch.native_batch_norm(h, bn.w, bn.b, bn.rm, bn.rv, m.training, m.momentum, m.eps)
        if shift is not None:
            bn.rm.add_(shift, alpha=m.momentum)
        return out, (mean, invstd, 1, (bn.w, bn.rm, bn.rv), m.training)
    rows = h.shape[0] // groups
    hv, w, b = h.view(rows, -1), torch.cat([bn.w] * groups), torch.cat([bn.b] * groups)
    if not m.training:
        rm, rv = torch.cat([bn.rm] * groups), torch.cat([bn.rv] * groups)
        out, mean, invstd = torch.native_batch_norm(hv, w, b, rm, rv, False, 0.0, m.eps)
        return out.view_as(h), (mean, invstd, groups, (w, rm, rv), False)
    out, mean, invstd = torch.native_batch_norm(hv, w, b, None, None, True, 0.0, m.eps)
    # The running averages as the calls in turn would update them: the batch mean (+ shift), the unbiased variance.
    mean_g = mean.view(groups, -1) if shift is None else mean.view(groups, -1) + shift
    var_g = (invstd.pow(-2) - m.eps).mul_(rows / max(rows - 1, 1)).view(groups, -1)
    bn.n.add_(groups)
    for mean_i, var_i in zip(mean_g.unbind(0), var_g.unbind(0)):
        torch._foreach_lerp_([bn.rm, bn.rv], [mean_i, var_i], m.momentum)
    return out.view_as(h), (mean, invstd, groups, (w, None, None), True)


def _batch_norm_backward(bn: SimpleNamespace | None, g: torch.Tensor, h: torch.Tensor, saved):
    """(∂/∂input, [∂/∂weight, ∂/∂bias]) of a _batch_norm_forward, by ATen's BatchNorm backward on the tensors the
    forward read (a group's parameter gradients are the sum over its columns)."""
    if bn is None:
        return g, []
    mean, invstd, groups, (w, rm, rv), training = saved
    rows = h.shape[0] // groups
    gi, gw, gb = _bn_backward(g.view(rows, -1), h.view(rows, -1), w, rm, rv, mean, invstd, training, bn.m.eps,
                              [True, True, True])
    if groups == 1:
        return gi, [gw, gb]
    return gi.view_as(g), [gw.view(groups, -1).sum(0), gb.view(groups, -1).sum(0)]


def batch_normalised(saved) -> bool:
    """Whether a _linear_batch_norm's BatchNorm normalised by the batch's own statistics (training mode)."""
    return saved is not None and saved[4]


def bias_grad(saved, g: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """∂/∂b of the linear layer h = x·wᵀ + b ahead of a _linear_batch_norm: the column sums of ∂/∂h, which are
    exactly zero behind a training-mode BatchNorm (its output does not depend on any shift of a column, b's
    included); there zeros, not the sums' float32 rounding noise (which Adam would scale up to full steps)."""
    return torch.zeros_like(bias) if batch_normalised(saved) else g.sum(0)


# ---- BranchedInput as one product


_eyes: dict = {}


def one_hot(k: torch.Tensor, num_steps: int, like: torch.Tensor) -> torch.Tensor:
    key = (num_steps, like.dtype, like.device)
    if key not in _eyes:
        _eyes[key] = torch.eye(num_steps, dtype=like.dtype, device=like.device)
    return F.embedding(k, _eyes[key])


def first_layer(sp: SimpleNamespace) -> dict:
    """W_first·C ([hidden, 16 + T]; its first 16 columns are W_x·W_post) and what its backward needs."""
    t1 = F.linear(sp.table, sp.t_w1, sp.t_b1)
    a1 = F.prelu(t1, sp.t_a)
    emb = F.linear(a1, sp.t_w2, sp.t_b2)
    c = torch.block_diag(sp.post_w, emb.t())
    c[:FEATURES, BRANCH:].add_(sp.post_b[:, None])  # (not +=: that reads, adds and writes the slice back)
    return dict(c=c, wc=sp.first_w @ c, t1=t1, a1=a1, emb=emb)


def first_layer_grads(sp: SimpleNamespace, fl: dict, g: torch.Tensor,
                      g_bias: torch.Tensor | None) -> list[torch.Tensor]:
    """Gradients of [post.w, post.b, step.net.0.w, .b, step.net.1.w, step.net.2.w, .b, first.w, first.b] from
    G = ∂(W_first·C) and ∂b_first; g_bias None: a training-mode BatchNorm follows (bias_grad), so the three
    biases that add the same vector to every row (post.b, step.net.2.b, first.b) have zero gradients."""
    d_c = sp.first_w.t() @ g
    d_emb = d_c[FEATURES:, BRANCH:].t()
    d_t1, d_slope = prelu_backward(d_emb @ sp.t_w2, fl["t1"], sp.t_a, overwrite=True)
    if g_bias is None:
        d_post_b, d_emb_b, g_bias = (torch.zeros_like(b) for b in (sp.post_b, sp.t_b2, sp.first_b))
    else:
        d_post_b, d_emb_b = d_c[:FEATURES, BRANCH:].sum(1), d_emb.sum(0)
    return [d_c[:FEATURES, :BRANCH], d_post_b, d_t1.t() @ sp.table, d_t1.sum(0), d_slope, d_emb.t() @ fl["a1"],
            d_emb_b, g @ fl["c"].t(), g_bias]


# ---- the generator's and encoder's body


def mlp_forward(sp: SimpleNamespace, inputs: torch.Tensor, k: torch.Tensor, groups: int = 1, fl: dict | None = None):
    """_ConditionalMLP.forward(inputs, k) (`groups` interleaved passes, see the module docstring) and its cache;
    `fl`: first_layer(sp) as an earlier pass with the same parameter values computed it."""
    fl = first_layer(sp) if fl is None else fl
    u, ub, bn0 = _linear_batch_norm(sp.bn0, inputs, sp.a, sp.c, groups)
    x20 = torch.cat([F.prelu(ub, sp.a0), one_hot(k, sp.steps, u)], 1)
    h0, h0b, bn1 = _linear_batch_norm(sp.bn1, x20, fl["wc"], sp.first_b, groups)
    v1 = F.prelu(h0b, sp.a1)
    h1, h1b, bn2 = _linear_batch_norm(sp.bn2, v1, sp.w2, sp.b2, groups)
    v2 = F.prelu(h1b, sp.a2)
    c = dict(inputs=inputs, fl=fl, u=u, ub=ub, bn0=bn0, x20=x20, h0=h0, h0b=h0b, bn1=bn1, v1=v1, h1=h1, h1b=h1b,
             bn2=bn2, v2=v2)
    if not sp.final:
        return F.linear(v2, sp.w3, sp.b3), c
    c["o"], c["ob"], c["bn3"] = _linear_batch_norm(sp.bn3, v2, sp.w3, sp.b3, groups)
    return F.prelu(c["ob"], sp.a3), c


def mlp_backward(sp: SimpleNamespace, c: dict, g: torch.Tensor, input_grad: bool):
    """(∂/∂inputs or None, parameter gradients in module.parameters() order) from ∂/∂output."""
    tail = []
    if sp.final:
        g, d_a = prelu_backward(g, c["ob"], sp.a3)
        g, d_bn = _batch_norm_backward(sp.bn3, g, c["o"], c["bn3"])
        tail = [*d_bn, d_a]
    d_out = [g.t() @ c["v2"], bias_grad(c.get("bn3"), g, sp.b3)]
    g, d_a2 = prelu_backward(g @ sp.w3, c["h1b"], sp.a2, overwrite=True)
    g, d_bn2 = _batch_norm_backward(sp.bn2, g, c["h1"], c["bn2"])
    d_hidden = [g.t() @ c["v1"], bias_grad(c["bn2"], g, sp.b2)]
    g, d_a1 = prelu_backward(product(g, sp.w2.t()), c["h0b"], sp.a1, overwrite=True)
    g, d_bn1 = _batch_norm_backward(sp.bn1, g, c["h0"], c["bn1"])
    first = first_layer_grads(sp, c["fl"], t_product(g, c["x20"]), None if batch_normalised(c["bn1"]) else g.sum(0))
    g, d_a0 = prelu_backward(g @ c["fl"]["wc"][:, :BRANCH], c["ub"], sp.a0, overwrite=True)
    g, d_bn0 = _batch_norm_backward(sp.bn0, g, c["u"], c["bn0"])
    grads = [g.t() @ c["inputs"], bias_grad(c["bn0"], g, sp.c), *d_bn0, d_a0, *first, *d_bn1, d_a1, *d_hidden,
             *d_bn2, d_a2, *d_out, *tail]
    return (g @ sp.a if input_grad else None), grads


def versions(tensors) -> list[int]:
    """The tensors' version counters: what an in-place change (an optimizer step, load_state_dict) advances."""
    return [t._version for t in tensors]


class _ConditionalMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sp, inputs, k, *parameters):
        out, ctx.cache = mlp_forward(sp, inputs, k)
        ctx.sp, ctx.versions = sp, versions(parameters)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        d_inputs, grads = mlp_backward(ctx.sp, ctx.cache, g, ctx.needs_input_grad[1])
        return None, d_inputs, None, *[d if need else None for d, need in zip(grads, ctx.needs_input_grad[3:])]


def conditional_mlp(mlp: _ConditionalMLP, inputs: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """_ConditionalMLP.forward(inputs, k) as one autograd node (first derivatives only), after mlp_supported."""
    sp = spec(mlp)
    return _ConditionalMLPFunction.apply(sp, inputs, k, *sp.params)


# ---- the energy


def energy_forward(sp: SimpleNamespace, x: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """f(x, k) and what the input-gradient chain and the backward need (s: the PReLU slopes)."""
    fl = first_layer(sp)
    u = F.linear(x, sp.a, sp.c)
    s0 = slope(u, sp.a0)
    x20 = torch.cat([F.prelu(u, sp.a0), one_hot(k, sp.steps, u)], 1)
    h0 = F.linear(x20, fl["wc"], sp.first_b)
    s1 = slope(h0, sp.a1)
    v1 = F.prelu(h0, sp.a1)
    h1 = product(v1, sp.w2, sp.b2)
    s2 = slope(h1, sp.a2)
    v2 = F.prelu(h1, sp.a2)
    f = torch.addmv(sp.b3, v2, sp.w3[0])
    if sp.base_std:
        f = f + base_log_density(x, k, sp.base_std)
    return f, dict(x=x, k=k, fl=fl, u=u, s0=s0, x20=x20, h0=h0, s1=s1, v1=v1, h1=h1, s2=s2, v2=v2)


def input_gradient_chain(sp: SimpleNamespace, c: dict) -> None:
    """Into c: e2 = s2 ⊙ w3, d2 = W2ᵀe2, e1 = s1 ⊙ d2, d1 = Mᵀe1, e0 = s0 ⊙ d1 (∂f/∂ pre-activations (e) and
    activations (d), row by row); ∇_x f = Aᵀe0."""
    c["e2"] = e2 = c["s2"] * sp.w3
    c["d2"] = d2 = product(e2, sp.w2.t())
    c["e1"] = e1 = d2 * c["s1"]
    c["d1"] = d1 = e1 @ c["fl"]["wc"][:, :BRANCH]
    c["e0"] = d1 * c["s0"]


def input_gradient(sp: SimpleNamespace, c: dict, rows: int | None = None) -> torch.Tensor:
    """∇_x f of the first `rows` rows (None: all) after input_gradient_chain: Aᵀe0, plus the base measure's
    score where the energy has one (its parameter gradients are the chain's alone)."""
    e0 = c["e0"] if rows is None else c["e0"][:rows]
    grad = e0 @ sp.a
    if sp.base_std:
        x, k = (c["x"], c["k"]) if rows is None else (c["x"][:rows], c["k"][:rows])
        grad = grad + base_score(x, k, sp.base_std)
    return grad


class _EnergyValue(torch.autograd.Function):
    """f(x, k) of a frozen energy, with its backward to x: ∇_x f of the input-gradient chain (input_gradient)."""

    @staticmethod
    def forward(ctx, sp, x, k):
        f, ctx.cache = energy_forward(sp, x, k)
        ctx.sp = sp
        return f

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        input_gradient_chain(ctx.sp, ctx.cache)
        return None, input_gradient(ctx.sp, ctx.cache) * g[:, None], None


def energy_value(energy: ToyEnergy, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """f(x, k) for a frozen energy (no parameter requires grad), differentiable in x; after energy_supported."""
    return _EnergyValue.apply(spec(energy), x, k)
