"""TorchEngine's direct fused-Adam step: the same parameters and optimizer state as Adam(fused=True).step()."""

import copy

import torch

from ddaebm.config import OptimConfig
from ddaebm.training.engine import TorchEngine


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
        engine.backward(ours(x).pow(2).sum())
        direct += engine._fused_adam_step()  # the step itself, to count it
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
    engine.backward(engine.module(torch.randn(3, 5)).sum())
    engine.step()  # creates the state
    engine.backward(engine.module(torch.randn(3, 5)).sum())
    hooked = copy.copy(engine)
    handle = engine.optimizer.register_step_pre_hook(lambda *a: None)
    assert not hooked._fused_adam_step()
    handle.remove()
    unfused = TorchEngine(_net(), 1e-3, OptimConfig(fused=False))
    unfused.backward(unfused.module(torch.randn(3, 5)).sum())
    unfused.step()
    unfused.backward(unfused.module(torch.randn(3, 5)).sum())
    assert not unfused._fused_adam_step()
    assert engine._fused_adam_step()
