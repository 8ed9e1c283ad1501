"""The performance mechanisms of training, in one place: what each saves, and how to turn it off.

None changes the math: each does what a plain PyTorch call would, in less time.

- `retain_freed_heap_memory` (CPU runs; process-wide, applied by the training entry point `loop.train`): glibc
  keeps the memory a step frees for the next step instead of returning it to the OS and page-faulting it back.
  Off: set any MALLOC_* environment variable (glibc's own tunables then rule).
- `fused_adam_step` / `fast_adam_steps` (every engine): Adam(fused=True)'s two kernels called directly on
  per-parameter lists built once, without Optimizer.step's Python around them. Off: optim.fused=false (the
  unfused torch Adam), and it steps aside by itself wherever Optimizer.step would do more (hooks, AMSGrad, ...).
- `flatten_parameters` (TorchEngine, the EMA): a network's parameters as views of one buffer, so the EMA's
  average is one lerp. Nothing to turn off: everything that updates parameters in place is unaffected.
- `drop_forward_hooks` (DeepSpeedEngine): DeepSpeed's forward hooks only start and stop its timers in the
  configurations built here; removing them saves their cost per network call and lets the toy fast path apply.
  It steps aside wherever the hooks do more (ZeRO 3, the flops profiler, fp16 input casting).
- `apply_gpu_settings` (GPU runs; process-wide, applied by the training entry point): cuDNN's autotuner and TF32
  as dist.cudnn_benchmark and dist.tf32 say (both are settings of the torch backends, not of a model).
- The shared-memory gradient exchange of CPU ranks on one host is ddaebm/training/reduce.py (used at ZeRO 0 on
  CPU ranks; DeepSpeed's own reduction elsewhere).

Measured figures are in bench/README.md.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch
from torch import nn
from torch.optim import optimizer as _optim


def retain_freed_heap_memory() -> None:
    """Keep memory that a training step frees for the next step, instead of returning it to the OS (glibc only).

    glibc serves blocks above a size threshold (dynamic, from 128 KiB) from fresh mappings and gives the top of
    the heap back to the OS once more than twice that threshold is free there. A CPU training step allocates and
    frees a few MB of activations every iteration, and what was given back page-faults in again on the next
    (about a tenth of a toy iteration in system time, bench/README.md). Fixed
    thresholds (blocks up to 8 MiB from the heap, up to 64 MiB of free heap kept) make each iteration reuse the
    previous one's memory. Process-wide and idempotent; leaves alone what MALLOC_* environment variables set, and
    does nothing without glibc's mallopt.
    """
    global _heap_retained
    if _heap_retained or sys.platform != "linux" or any(k.startswith("MALLOC_") for k in os.environ):
        return
    _heap_retained = True
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(-3, 8 << 20)  # M_MMAP_THRESHOLD
    mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD


_heap_retained = False


def apply_gpu_settings(cudnn_benchmark: bool, tf32: bool) -> None:
    """cuDNN's autotuner on or off; TF32 for fp32 matrix products and convolutions on or off (explicitly: cuDNN
    would otherwise use TF32 for convolutions while matmuls stay fp32)."""
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def fused_adam_step(opt: torch.optim.Optimizer) -> bool:
    """Adam(fused=True).step() as its two kernels, without the per-call Python around them (a few percent of a
    toy iteration). The same state tensors, hence the same state_dict; False (and
    nothing done) wherever Optimizer.step would do more: its first step (state to create), hooks, several
    groups or devices, AMSGrad, capturable, a grad scaler's attributes, a step wrapped by someone else."""
    wrapper = opt.__dict__.get("step")  # e.g. an LR scheduler counting the calls; ours (fast_adam_steps) is fine
    if ((wrapper is not None and not getattr(wrapper, "fused_adam_fast_path", False))
            or len(opt.param_groups) != 1 or opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks
            or _optim._global_optimizer_pre_hooks or _optim._global_optimizer_post_hooks
            or getattr(opt, "grad_scale", None) is not None):
        return False
    group = opt.param_groups[0]
    if (not group.get("fused") or group["amsgrad"] or group["capturable"] or group["differentiable"]
            or group.get("decoupled_weight_decay", False) or torch.is_tensor(group["lr"])):
        return False
    grads = [p.grad for p in group["params"]]
    plan = opt.__dict__.get("_ddaebm_plan")
    if plan is None or not plan.serves(opt, group, grads):
        plan = _AdamPlan.build(opt, group, grads)
        if plan is None:
            return False
        opt._ddaebm_plan = plan
    beta1, beta2 = group["betas"]
    found_inf = getattr(opt, "found_inf", None)  # a device flag: 1 skips the update in the kernel (no host read)
    plan.steps_buffer.add_(1)
    torch._fused_adam_(plan.params, [g for g in grads if g is not None], plan.exp_avgs, plan.exp_avg_sqs, [],
                       plan.steps, amsgrad=False, lr=group["lr"], beta1=float(beta1), beta2=float(beta2),
                       weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
                       grad_scale=None, found_inf=found_inf)
    if found_inf is not None:  # a skipped step does not count (as Adam.step does it)
        plan.steps_buffer.sub_(found_inf)
    return True


class _AdamPlan:
    """The per-parameter lists fused_adam_step hands the kernels, built once for a given optimizer state and set
    of parameters with gradients (walking every parameter's state each step costs more than the kernels at toy
    size)."""

    @classmethod
    def build(cls, opt: torch.optim.Optimizer, group: dict, grads: list) -> "_AdamPlan | None":
        """None where Optimizer.step must run: its first step (state to create), a sparse gradient, mixed
        devices or dtypes."""
        plan = cls()
        plan.state, plan.group_params, plan.mask = opt.state, group["params"], [g is not None for g in grads]
        plan.params, plan.exp_avgs, plan.exp_avg_sqs, steps = [], [], [], []
        device = group["params"][0].device
        for p, grad in zip(group["params"], grads):
            if grad is None:
                continue
            state = opt.state.get(p)
            if not state or grad.is_sparse or p.device != device or p.dtype != grad.dtype:
                return None
            plan.params.append(p)
            plan.exp_avgs.append(state["exp_avg"])
            plan.exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not plan.params or len({p.dtype for p in plan.params}) != 1:
            return None
        plan.steps_buffer = _step_buffer(opt, plan.params, steps)
        plan.steps = steps
        return plan

    def serves(self, opt: torch.optim.Optimizer, group: dict, grads: list) -> bool:
        """The same state (a loaded state_dict replaces it), parameters, and parameters with gradients."""
        return (opt.state is self.state and group["params"] is self.group_params
                and [g is not None for g in grads] == self.mask)


def _step_buffer(opt: torch.optim.Optimizer, params: list, steps: list) -> torch.Tensor:
    """One tensor whose elements are the `params`' state["step"] (which become 0-dim views of it, in place in
    `steps` too): the steps advance together, and one add_ replaces _foreach_add_'s per-tensor loop on CPU.
    Rebuilt, values kept, whenever a step is no longer a view of
    it (a loaded state_dict, a different set of parameters with gradients)."""
    buffer = opt.__dict__.get("_ddaebm_steps")
    if buffer is None or buffer.numel() != len(steps) or any(s._base is not buffer for s in steps):
        buffer = opt._ddaebm_steps = torch.stack(steps)
        views = buffer.unbind(0)
        for i, (p, view) in enumerate(zip(params, views)):
            opt.state[p]["step"] = steps[i] = view
    return buffer


def fast_adam_steps(opt: torch.optim.Optimizer) -> None:
    """Make `opt.step()` take fused_adam_step wherever it applies, for callers that step it themselves (a
    DeepSpeed engine at ZeRO 0 calls its client optimizer's step directly)."""
    plain = opt.step

    def step(closure=None):
        if closure is None and fused_adam_step(opt):
            return None
        return plain(closure)

    step.fused_adam_fast_path = True
    opt.step = step


def flatten_parameters(module: nn.Module) -> torch.Tensor | None:
    """Lay the module's parameters out back to back in one buffer (each becomes a view of it, values kept) and
    return the buffer; None (nothing changed) unless they share one dtype and device and are contiguous (a
    channels_last weight keeps its memory format).

    Whatever updates parameters in place (Adam, load_state_dict) is unaffected; what walks all of them as one
    tensor gains: the EMA's average becomes one lerp instead of a per-tensor loop (ddaebm/training/ema.py).
    """
    params = list(module.parameters())
    if not params or len({(p.dtype, p.device) for p in params}) != 1 or not all(p.is_contiguous() for p in params):
        return None
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    for p in params:
        p.data = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    return flat


def drop_forward_hooks(engine) -> None:
    """Remove the forward pre/post hooks DeepSpeed puts on the module it wraps.

    The losses call `engine.module(x)` (module docstring), so the hooks run on every network call, where in the
    configurations built here (ZeRO ≤ 2, no flops profiler, no fp16 input casting) they only start and stop
    DeepSpeed's throughput and wall-clock timers. Their presence also keeps the toy networks off their
    hand-written passes (ddaebm/networks/toy_fused.py takes those only for hook-free modules). Left in place for
    any configuration where they do more.
    """
    if (engine.zero_optimization_partition_weights() or engine.flops_profiler_enabled()
            or engine.fp16_auto_cast()):
        return
    for name in ("module_forward_pre_hook", "module_forward_post_hook"):
        handle = getattr(engine, name, None)
        if handle is not None:
            handle.remove()
            setattr(engine, name, None)
