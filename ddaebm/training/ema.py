"""Exponential moving averages of the generator+encoder and of the energy (method.md §5, §13).

Explicit shadow copies, updated after every iteration and independent of `requires_grad` (the official
swap skipped the frozen energy, so its saved D was raw). The raw networks live in the engines, so a
checkpoint holds both the raw and the EMA energy.
"""

from __future__ import annotations

import torch
from torch import nn

from ddaebm.model import averaged_copy
from ddaebm.training.perf import flatten_parameters


def contiguous_whole(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """One 1-D float32 tensor covering exactly `tensors`, when they lie back to back, in order, contiguous, in
    one storage (and fill it); else None."""
    if not tensors or any(t.dtype != torch.float32 or not t.is_contiguous() for t in tensors):
        return None
    storage, start = tensors[0].untyped_storage(), tensors[0].storage_offset()
    offset = start
    for t in tensors:
        if t.untyped_storage().data_ptr() != storage.data_ptr() or t.storage_offset() != offset:
            return None
        offset += t.numel()
    if start != 0 or offset * 4 != storage.nbytes():
        return None
    return torch.empty(0, dtype=torch.float32, device=tensors[0].device).set_(storage, 0, (offset,), (1,))


class EMA:
    def __init__(self, modules: dict[str, nn.Module], decay: float):
        self.decay = decay
        self.shadow = {name: averaged_copy(m) for name, m in modules.items()}
        for shadow in self.shadow.values():  # one buffer, like TorchEngine's modules (a deep copy clones each)
            flatten_parameters(shadow)
        # name -> (module, its parameters, the shadow's, its buffers, the shadow's): walking the module trees
        # each iteration cost more than the averaging itself at toy size
        self._bound: dict[str, tuple] = {}

    def _tensors(self, name: str, module: nn.Module) -> tuple:
        bound = self._bound.get(name)
        if bound is None or bound[0] is not module:
            shadow = self.shadow[name]
            params, shadow_params = list(module.parameters()), list(shadow.parameters())
            flats = (contiguous_whole(params), contiguous_whole(shadow_params))
            bound = self._bound[name] = (module, params, shadow_params, list(module.buffers()),
                                         list(shadow.buffers()), flats if all(f is not None for f in flats) else None,
                                         [p.data_ptr() for p in params])
        return bound

    @torch.no_grad()
    def update(self, modules: dict[str, nn.Module]) -> None:
        """shadow ← lerp(shadow, module, 1 − decay) for the parameters; buffers (BatchNorm statistics) copied.

        The tensor lists are gathered at a module's first update: its parameter and buffer objects must stay the
        same ones (in-place updates, load_state_dict and DeepSpeed's flattening all keep them). Where both
        sides' parameters lie back to back in one buffer (TorchEngine's layout, and the shadow's deep copy of
        it), one lerp averages them all, as long as the module's parameters still sit where they were."""
        for name, module in modules.items():
            _, params, shadow_params, buffers, shadow_buffers, flats, pointers = self._tensors(name, module)
            if flats is not None and [p.data_ptr() for p in params] == pointers:
                flats[1].lerp_(flats[0], 1.0 - self.decay)
            else:
                if any(p.dtype != torch.float32 for p in params):
                    params = [p.float() for p in params]
                torch._foreach_lerp_(shadow_params, params, 1.0 - self.decay)
            torch._foreach_copy_(shadow_buffers, buffers)

    def state_dict(self) -> dict:
        return {name: m.state_dict() for name, m in self.shadow.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, m in self.shadow.items():
            m.load_state_dict(state[name])
