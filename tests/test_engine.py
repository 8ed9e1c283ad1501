"""The direct fused-Adam step (TorchEngine, and DeepSpeed's client optimizer at ZeRO 0): the same parameters and
optimizer state as Adam(fused=True).step()."""

import copy

import pytest
import torch

from ddaebm.config import OptimConfig
from ddaebm.training.engine import TorchEngine
from ddaebm.training.perf import fast_adam_steps, fused_adam_step

NO = torch.zeros(2)  # the agreed flags [non-finite, stop]: neither


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.PReLU(), torch.nn.Linear(7, 1))


def test_direct_step_is_bitwise_adam():
    ours, ref = _net(), _net()
    cfg = OptimConfig(beta1=0.0, beta2=0.9)
    engine = TorchEngine(ours, 1e-3, cfg)
    adam = torch.optim.Adam(ref.parameters(), lr=1e-3, betas=(0.0, 0.9), eps=cfg.adam_eps, fused=True)
    direct = 0
    for i in range(12):
        x = torch.randn(9, 5)
        engine.zero_grad()
        engine.backward_agreed(ours(x).pow(2).sum(), NO)
        direct += fused_adam_step(engine.optimizer)  # the step itself, to count it
        adam.zero_grad()
        ref(x).pow(2).sum().backward()
        adam.step()
        if i == 0:
            assert direct == 0  # the first step creates Adam's state: Optimizer.step does it
            engine.optimizer.step()
        if i == 6:
            engine.set_lr(3e-4)
            adam.param_groups[0]["lr"] = 3e-4
    assert direct == 11
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    state, ref_state = engine.optimizer.state_dict()["state"], adam.state_dict()["state"]
    for k in state:
        for name in state[k]:
            assert torch.equal(state[k][name], ref_state[k][name])


def test_direct_step_steps_aside():
    engine = TorchEngine(_net(), 1e-3, OptimConfig())
    engine.backward_agreed(engine.module(torch.randn(3, 5)).sum(), NO)
    engine.step(NO[0])  # creates the state
    engine.backward_agreed(engine.module(torch.randn(3, 5)).sum(), NO)
    hooked = copy.copy(engine)
    handle = engine.optimizer.register_step_pre_hook(lambda *a: None)
    assert not fused_adam_step(hooked.optimizer)
    handle.remove()
    unfused = TorchEngine(_net(), 1e-3, OptimConfig(fused=False))
    unfused.backward_agreed(unfused.module(torch.randn(3, 5)).sum(), NO)
    unfused.step(NO[0])
    unfused.backward_agreed(unfused.module(torch.randn(3, 5)).sum(), NO)
    assert not fused_adam_step(unfused.optimizer)
    assert fused_adam_step(engine.optimizer)


def test_fast_steps_installed_on_an_optimizer_are_bitwise_adam():
    """What a DeepSpeed engine at ZeRO 0 calls: opt.step() itself, taking the direct kernels from step 2 on."""
    ours, ref = _net(), _net()
    fast = torch.optim.Adam(ours.parameters(), lr=1e-3, betas=(0.0, 0.9), fused=True)
    adam = torch.optim.Adam(ref.parameters(), lr=1e-3, betas=(0.0, 0.9), fused=True)
    fast_adam_steps(fast)
    for _ in range(5):
        x = torch.randn(9, 5)
        for net, opt in ((ours, fast), (ref, adam)):
            opt.zero_grad()
            net(x).pow(2).sum().backward()
            opt.step()
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    assert fused_adam_step(fast) and fused_adam_step(adam)  # ours is a wrapper it accepts (one more step each)
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    plain = adam.step
    adam.step = lambda closure=None: plain(closure)  # someone else's wrapper (an LR scheduler's, say)
    assert not fused_adam_step(adam)


def test_shared_step_counter_survives_a_reload_and_a_missing_gradient():
    """The steps live in one buffer (one add_ a step): a state_dict round trip into a fresh engine, and a
    parameter without a gradient for a while (its step must stay), keep the run bitwise Adam."""
    ours, ref = _net(), _net()
    cfg = OptimConfig(beta1=0.0, beta2=0.9)
    engine = TorchEngine(ours, 1e-3, cfg)
    adam = torch.optim.Adam(ref.parameters(), lr=1e-3, betas=(0.0, 0.9), eps=cfg.adam_eps, fused=True)
    for i in range(10):
        if i == 8:  # resume: a new engine loads the saved state (the step tensors arrive as separate tensors)
            saved = copy.deepcopy(engine.state_dict())
            engine = TorchEngine(ours, 1e-3, cfg)
            engine.load_state_dict(saved)
        x = torch.randn(9, 5)
        frozen = 3 <= i < 7  # the first layer's bias gets no gradient in these steps
        for net in (ours, ref):
            net[0].bias.requires_grad_(not frozen)
        engine.zero_grad()
        engine.backward_agreed(ours(x).pow(2).sum(), NO)
        engine.step(NO[0])
        adam.zero_grad()
        ref(x).pow(2).sum().backward()
        adam.step()
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    state, ref_state = engine.optimizer.state_dict()["state"], adam.state_dict()["state"]
    assert [state[k]["step"].item() for k in sorted(state)] == [10.0, 6.0, 10.0, 10.0, 10.0]
    for k in state:
        for name in state[k]:
            assert torch.equal(state[k][name], ref_state[k][name]), (k, name)


def test_flat_parameters_and_the_ema_average():
    import copy

    from ddaebm.training.ema import EMA, contiguous_whole
    from ddaebm.training.perf import flatten_parameters

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 2))
    values = [p.detach().clone() for p in net.parameters()]
    flat = flatten_parameters(net)
    assert flat.numel() == sum(v.numel() for v in values)
    for p, v in zip(net.parameters(), values):
        assert torch.equal(p, v) and p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    assert torch.equal(contiguous_whole(list(net.parameters())), flat)
    assert contiguous_whole(list(net.parameters())[1:]) is None  # not the whole buffer
    assert flatten_parameters(torch.nn.Linear(2, 2).to(torch.float64).requires_grad_()) is not None
    mixed = torch.nn.Linear(2, 2)
    mixed.bias.data = mixed.bias.data.double()
    assert flatten_parameters(mixed) is None
    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)  # model.channels_last: left as it is
    assert flatten_parameters(conv) is None and conv.weight.is_contiguous(memory_format=torch.channels_last)

    # The one-lerp average equals the per-tensor one, and steps aside once a parameter moves elsewhere.
    plain = copy.deepcopy(net)
    fast, slow = EMA({"n": net}, 0.9), EMA({"n": plain}, 0.9)
    for p in plain.parameters():  # a deep copy clones each parameter: not one buffer
        p.data = p.data.clone()
    for step in range(3):
        with torch.no_grad():
            for a, b in zip(net.parameters(), plain.parameters()):
                a.add_(step + 1.0)
                b.add_(step + 1.0)
        if step == 2:
            net[0].weight.data = net[0].weight.data.clone()  # no longer a view of the buffer
        fast.update({"n": net})
        slow.update({"n": plain})
    assert fast._bound["n"][5] is not None and slow._bound["n"][5] is None
    for a, b in zip(fast.shadow["n"].parameters(), slow.shadow["n"].parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fused", [True, False])
def test_a_skip_flag_skips_the_update_and_its_step_count(fused):
    """engine.step(skip): fused Adam skips on the device (found_inf: no host read), the unfused one after reading
    the flag; either way no parameter moves and the step counter stays."""
    engine = TorchEngine(_net(), 1e-3, OptimConfig(fused=fused))
    for skip in (0.0, 0.0, 1.0):
        before = [p.detach().clone() for p in engine.module.parameters()]
        engine.zero_grad()
        engine.backward_agreed(engine.module(torch.randn(3, 5)).sum(), NO)
        engine.step(torch.tensor(skip))
        moved = any(not torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))
        assert moved == (skip == 0.0)
    steps = {float(s["step"]) for s in engine.optimizer.state.values()}
    assert steps == {2.0}
