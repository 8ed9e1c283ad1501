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
- `conditional_mlp` (generator and encoder bodies) and `energy_value` wrap these as single autograd nodes;
- the passes read a module's tensors from a flat "spec" resolved once per module, not through nn.Module's
  attribute lookups (a few hundred per iteration otherwise).

ddaebm/toy_losses.py builds the two training objectives from them. Each entry point is used only where
`*_supported` confirms the exact structure it was written for (the classes of ddaebm/networks/toy.py, no hooks,
no autocast, one dtype); everything else, other networks included, takes the generic autograd path, which stays
the definition these are tested against (tests/test_toy_fused.py).
"""

from __future__ import annotations

import contextlib
import os
import weakref
from itertools import chain
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules import module as _module

from ddaebm.networks.layers import PReLU
from ddaebm.networks.toy import (BRANCH, FEATURES, BranchedInput, StepEmbedding, ToyEnergy, _ConditionalMLP,
                                 base_log_density, base_score)

_threshold_backward = torch.ops.aten.threshold_backward
_bn_backward = torch.ops.aten.native_batch_norm_backward

# False: every toy network takes the generic autograd path (tests, the bench; DDAEBM_TOY_FUSED=0 for a whole run)
enabled = os.environ.get("DDAEBM_TOY_FUSED", "1") != "0"


@contextlib.contextmanager
def disabled():
    """Within: the generic autograd path everywhere, the definition the fast path is tested against."""
    global enabled
    previous, enabled = enabled, False
    try:
        yield
    finally:
        enabled = previous


# ---- where the fast path applies


def is_linear(m) -> bool:
    return type(m) is nn.Linear and m.bias is not None


def _prelu(m) -> bool:
    return type(m) is PReLU and m.weight.numel() == 1


def _batch_norm(m) -> bool:
    return type(m) is nn.BatchNorm1d and m.affine and m.track_running_stats and m.momentum is not None


def _norm(m) -> bool:
    return type(m) is nn.Identity or _batch_norm(m)


def _branch_ok(bi) -> bool:
    step = bi.step
    return (type(bi) is BranchedInput and len(bi.pre) == 3 and is_linear(bi.pre[0]) and _norm(bi.pre[1])
            and _prelu(bi.pre[2]) and is_linear(bi.post) and is_linear(bi.first) and type(step) is StepEmbedding
            and len(step.net) == 3 and is_linear(step.net[0]) and _prelu(step.net[1]) and is_linear(step.net[2])
            and bi.post.in_features == BRANCH and bi.first.in_features == 2 * FEATURES)


def _energy_layout(energy) -> bool:
    head = energy.head
    return (len(head) == 4 and _prelu(head[0]) and is_linear(head[1]) and _prelu(head[2]) and is_linear(head[3])
            and head[3].out_features == 1 and _branch_ok(energy.input) and type(energy.input.pre[1]) is nn.Identity)


def mlp_layout(mlp) -> bool:
    d = mlp.decoder
    return (len(d) in (6, 8) and _norm(d[0]) and _prelu(d[1]) and is_linear(d[2]) and _norm(d[3]) and _prelu(d[4])
            and is_linear(d[5]) and (len(d) == 6 or (_norm(d[6]) and _prelu(d[7]))) and _branch_ok(mlp.input))


def _bn_spec(m) -> SimpleNamespace | None:
    if type(m) is nn.Identity:
        return None
    return SimpleNamespace(m=m, w=m.weight, b=m.bias, rm=m.running_mean, rv=m.running_var, n=m.num_batches_tracked)


def _branch_spec(bi: BranchedInput) -> SimpleNamespace:
    """Direct references to BranchedInput's tensors: the passes skip nn.Module's attribute lookups."""
    net = bi.step.net
    return SimpleNamespace(a=bi.pre[0].weight, c=bi.pre[0].bias, bn0=_bn_spec(bi.pre[1]), a0=bi.pre[2].weight,
                           post_w=bi.post.weight, post_b=bi.post.bias, t_w1=net[0].weight, t_b1=net[0].bias,
                           t_a=net[1].weight, t_w2=net[2].weight, t_b2=net[2].bias, table=bi.step.table,
                           steps=bi.step.table.shape[0], first_w=bi.first.weight, first_b=bi.first.bias)


def energy_spec(energy: ToyEnergy) -> SimpleNamespace:
    head = energy.head
    sp = _branch_spec(energy.input)
    sp.a1, sp.w2, sp.b2, sp.a2, sp.w3, sp.b3 = (head[0].weight, head[1].weight, head[1].bias, head[2].weight,
                                                head[3].weight, head[3].bias)
    sp.base_std = energy.base_std
    return sp


def mlp_spec(mlp: _ConditionalMLP) -> SimpleNamespace:
    d = mlp.decoder
    sp = _branch_spec(mlp.input)
    sp.bn1, sp.a1, sp.w2, sp.b2 = _bn_spec(d[0]), d[1].weight, d[2].weight, d[2].bias
    sp.bn2, sp.a2, sp.w3, sp.b3 = _bn_spec(d[3]), d[4].weight, d[5].weight, d[5].bias
    sp.bn3, sp.a3 = (_bn_spec(d[6]), d[7].weight) if len(d) == 8 else (None, None)
    sp.final = len(d) == 8
    return sp


def _members(modules: tuple) -> tuple:
    """The non-empty dictionaries holding the modules' children, parameters and buffers (the same objects for a
    module's lifetime: nn.Module's __setattr__, register_* and torch.func.functional_call change them in place).
    An empty one is left out: what could be added to it (a child of a Linear, a parameter of an Identity) would
    not change what the module computes."""
    return tuple(d for m in modules for d in (m._modules, m._parameters, m._buffers) if d)


def _identities(members: tuple) -> tuple:
    """A key of the members' identities: tensors have no scalar ==, and a replaced one must count as a change
    even when equal (iterated in C: ~4 µs for a toy network, 5 times per iteration)."""
    return tuple(map(id, chain.from_iterable(map(dict.values, members))))


class _Layout:
    """A module whose layout passed, its spec, and what would make the spec stale or the fast path wrong: a
    replaced member (by identity), hooks, a per-instance forward, BatchNorm's momentum, the energy's base_std."""

    def __init__(self, module: nn.Module, sp: SimpleNamespace):
        modules = tuple(module.modules())
        self.sp, self.members = sp, _members(modules)
        # the key's objects, kept alive so that no id in it is reused (they hold the submodules, not the
        # weakly-keyed module itself)
        self.objects = list(chain.from_iterable(map(dict.values, self.members)))
        self.key = tuple(map(id, self.objects))
        self.hooks = tuple(d for m in modules for d in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks,
                                                         m._backward_pre_hooks))
        self.instance_dicts = tuple(m.__dict__ for m in modules)
        self.settings = tuple((m.__dict__, name) for m in modules for name in ("momentum", "base_std")
                              if name in m.__dict__)
        self.values = self.current_settings()

    def current_settings(self) -> tuple:
        return tuple(d.get(name) for d, name in self.settings)

    def current(self) -> bool:
        """Nothing in it was replaced, and its settings are the ones its spec was built with."""
        return _identities(self.members) == self.key and self.current_settings() == self.values

    def hooked(self) -> bool:
        """Whether hooks or a per-instance forward (autocast_bf16's wrapper, a swapped method) sit on any module."""
        return any(self.hooks) or any("forward" in d for d in self.instance_dicts)


# module -> its _Layout once its layout passed; weak (and holding no reference to the module), so copies start
# afresh and a dropped module is forgotten
_layouts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def supported_spec(module: nn.Module, layout, build, x: torch.Tensor) -> SimpleNamespace | None:
    """`build(module)` (cached, with .params = module.parameters()) when the module's layout passes (checked once,
    rechecked if anything in it was replaced), no hooks or per-instance forward sit anywhere inside, no autocast
    is on, and the parameters are of x's dtype and device; else None."""
    entry = _layouts.get(module)
    if entry is None or not entry.current():
        if not layout(module):
            return None
        sp = build(module)
        sp.params = list(module.parameters())
        entry = _layouts[module] = _Layout(module, sp)
    if (_module._global_forward_hooks or _module._global_forward_pre_hooks or _module._global_backward_hooks
            or getattr(_module, "_global_backward_pre_hooks", None) or not x.is_floating_point()
            or torch.is_autocast_enabled(x.device.type) or entry.hooked()):
        return None
    sp, dtype, device = entry.sp, x.dtype, x.device
    for p in sp.params:
        if p.dtype != dtype or p.device != device:
            return None
    return sp


def spec(module: nn.Module) -> SimpleNamespace:
    """The spec of a module that passed its `*_supported` check."""
    entry = _layouts.get(module)
    if entry is None:
        raise ValueError(f"{type(module).__name__}: call its *_supported check before the fast path")
    return entry.sp


def energy_supported(energy: nn.Module, x: torch.Tensor) -> bool:
    """Whether `energy` is exactly ToyEnergy as written (so the closed forms here are its gradients)."""
    return enabled and type(energy) is ToyEnergy and supported_spec(energy, _energy_layout, energy_spec, x) is not None


def mlp_supported(mlp: nn.Module, x: torch.Tensor) -> bool:
    """Whether `mlp` is exactly the generator/encoder template _ConditionalMLP as written."""
    if not enabled or type(mlp) is not _ConditionalMLP:
        return False
    sp = supported_spec(mlp, mlp_layout, mlp_spec, x)
    # nn.BatchNorm1d refuses a training batch of one: leave that error to it.
    return sp is not None and (x.shape[0] > 1 or not (mlp.training and any(
        b is not None for b in (sp.bn0, sp.bn1, sp.bn2, sp.bn3))))


# ---- the hidden layers' products


def cpu_vendor() -> str:
    """The CPU's vendor string as the kernel reports it (e.g. GenuineIntel, AuthenticAMD); "" where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _onednn_linear(choice: str | None = None, vendor: str | None = None):
    """oneDNN's fp32 linear (the op PyTorch's CPU compiler emits) where the hidden products should take it, else
    None (ATen's matmul, i.e. MKL). `choice` (default: the DDAEBM_TOY_LINEAR environment variable, else "auto"):
    "onednn", "aten", or "auto": oneDNN except on Intel CPUs. On the project's AMD machines oneDNN took 8-12% less
    time than MKL, one product at a time (341 vs 378 µs for 200×300·300×300ᵀ, 676 vs 770 for 400 rows); on an
    Intel Xeon (AVX-512) MKL took ~7% less without a bias (258 vs 280, 556 vs 595 µs), ~4% less per toy iteration
    (`python bench/toy_ab.py 9d5d8c0 --reference-math`, that revision taking oneDNN everywhere). Fixed per
    process and machine: a run and its resumptions there round the same way."""
    choice = os.environ.get("DDAEBM_TOY_LINEAR", "auto") if choice is None else choice
    if choice not in ("auto", "onednn", "aten"):
        raise ValueError(f"DDAEBM_TOY_LINEAR={choice!r}: expected auto, onednn or aten")
    if choice == "aten" or (choice == "auto" and (cpu_vendor() if vendor is None else vendor) == "GenuineIntel"):
        return None
    try:
        if torch.backends.mkldnn.is_available():
            return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        pass
    return None


_linear_onednn = _onednn_linear()
ONEDNN_MIN_FEATURES = 128  # both sides of the weight: the hidden × hidden layers (where it was measured faster)


def product(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x·wᵀ (+ bias), IEEE float32 either way. A hidden × hidden product on the CPU runs through oneDNN's linear
    where _onednn_linear chose it (faster than ATen's MKL matmul on AMD CPUs, slower on Intel ones). Smaller
    products, and the weight gradients (gᵀ·x), stay with ATen, where oneDNN was no faster; so does everything
    else (another dtype or device)."""
    if (_linear_onednn is not None and x.dtype == torch.float32 and x.device.type == "cpu"
            and w.shape[0] >= ONEDNN_MIN_FEATURES and w.shape[1] >= ONEDNN_MIN_FEATURES):
        return _linear_onednn(x, w, bias, "none", [], "")
    return F.linear(x, w, bias)


def t_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """aᵀ·b, as (bᵀ·a)ᵀ (a transposed view) where b is much narrower than a: the BLAS kernel for a wide transposed
    left factor and a narrow right one is the slow one here (400×300ᵀ·400×20, the first layer's weight
    gradient: 82 µs against 63 the other way round, one product at a time; with 2 columns, 140 against 20)."""
    return (b.t() @ a).t() if 2 * b.shape[1] <= a.shape[1] else a.t() @ b


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
