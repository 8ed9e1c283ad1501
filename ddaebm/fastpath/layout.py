"""Where the toy fast path applies: the exact module layouts its passes were written for, and their "specs".

A spec is a flat namespace of direct references to a module's tensors, resolved once per module, so the passes
skip nn.Module's attribute lookups (a few hundred per iteration otherwise). `*_supported` confirms, at every
call, that a module is still the structure the passes compute: the classes of ddaebm/networks/toy.py with the
same members (by identity), no hooks or per-instance forward (autocast, DeepSpeed's timers), no autocast, and
parameters of the input's dtype and device. Anything else is left to the generic autograd path.
"""

from __future__ import annotations

import weakref
from itertools import chain
from types import SimpleNamespace

import torch
from torch import nn
from torch.nn.modules import module as _module

from ddaebm.networks.layers import PReLU
from ddaebm.networks.toy import (BRANCH, FEATURES, BranchedInput, StepEmbedding, ToyEncoder, ToyEnergy,
                                 ToyGenerator, _ConditionalMLP)


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


def generator_layout(g) -> bool:
    return type(g) is ToyGenerator and mlp_layout(g.net)


def encoder_layout(e) -> bool:
    return type(e) is ToyEncoder and is_linear(e.mu) and is_linear(e.logvar) and mlp_layout(e.body)


def generator_spec(g: ToyGenerator) -> SimpleNamespace:
    return mlp_spec(g.net)


def encoder_spec(e: ToyEncoder) -> SimpleNamespace:
    sp = mlp_spec(e.body)
    sp.mu_w, sp.mu_b, sp.lv_w, sp.lv_b, sp.lv_range = e.mu.weight, e.mu.bias, e.logvar.weight, e.logvar.bias, \
        e.logvar_range
    return sp


def _members(modules: tuple) -> tuple:
    """The non-empty dictionaries holding the modules' children, parameters and buffers (the same objects for a
    module's lifetime: nn.Module's __setattr__, register_* and torch.func.functional_call change them in place).
    An empty one is left out: what could be added to it (a child of a Linear, a parameter of an Identity) would
    not change what the module computes."""
    return tuple(d for m in modules for d in (m._modules, m._parameters, m._buffers) if d)


def _identities(members: tuple) -> tuple:
    """A key of the members' identities: tensors have no scalar ==, and a replaced one must count as a change
    even when equal (iterated in C: it runs several times per iteration)."""
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
    return type(energy) is ToyEnergy and supported_spec(energy, _energy_layout, energy_spec, x) is not None


def mlp_supported(mlp: nn.Module, x: torch.Tensor) -> bool:
    """Whether `mlp` is exactly the generator/encoder template _ConditionalMLP as written."""
    if type(mlp) is not _ConditionalMLP:
        return False
    sp = supported_spec(mlp, mlp_layout, mlp_spec, x)
    # nn.BatchNorm1d refuses a training batch of one: leave that error to it.
    return sp is not None and (x.shape[0] > 1 or not (mlp.training and any(
        b is not None for b in (sp.bn0, sp.bn1, sp.bn2, sp.bn3))))
