"""The DeepSpeed backend: one DeepSpeed engine per player, implementing ddaebm/training/engine.py's Engine.

Imported only when `dist.backend=deepspeed`, so the single-process path never loads DeepSpeed. The losses call
the networks directly (`engine.module(x)`, never `engine(x)`): the R1 penalty differentiates the energy with
`autograd.grad(create_graph=True)` and the generator's loss runs through the frozen energy, and calling the
engine there breaks DeepSpeed's backward bookkeeping (docs/architecture.md, stack notes). Each engine gets one backward per phase.
EMA lives outside the engines (ddaebm/training/ema.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from ddaebm import distributed
from ddaebm.config import Config, DistConfig, OptimConfig
from ddaebm.errors import BadInput
from ddaebm.training.engine import ENGINE_NAMES, adam, step_on_device
from ddaebm.training.perf import drop_forward_hooks, fast_adam_steps
from ddaebm.networks.precision import autocast_bf16, keep_losses_in_fp32
from ddaebm.training.reduce import build_reducer, reduce_gradients_and_flags

TAG = "ds"
UNIVERSAL_TAG = "ds_universal"


def ds_config(d: DistConfig, micro_batch: int, load_universal: bool) -> dict:
    """The engine config: ZeRO stage, precision, clipping (the optimizer is ours: `adam`)."""
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": d.zero_stage},
        "gradient_clipping": d.grad_clip,
        "steps_per_print": 2**31 - 1,
        "checkpoint": {"load_universal": load_universal},
    }
    if d.precision == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return cfg


class DeepSpeedEngine:
    """A network in a DeepSpeed engine. Its optimizer state (ZeRO shards) lives in `save`'s folder, state.pt gets
    the fp32 weights for sampling and evaluation."""

    def __init__(self, module: nn.Module, lr: float, o: OptimConfig, d: DistConfig, micro_batch: int,
                 load_universal: bool = False, reducer=None):
        """`reducer` (ddaebm/training/reduce.py; ZeRO 0 only): averages the gradients in place of DeepSpeed's
        all-reduce, carrying the iteration's flags in the same exchange."""
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        if d.precision == "fp16" and not get_accelerator().is_fp16_supported():
            raise BadInput("dist.precision=fp16: this device has no fp16 support in DeepSpeed; use bf16 or fp32")
        params = [p for p in module.parameters() if p.requires_grad]
        client = adam(params, lr, o)
        self.engine, _, _, _ = deepspeed.initialize(model=module, optimizer=client,
                                                    config=ds_config(d, micro_batch, load_universal))
        drop_forward_hooks(self.engine)
        if self.engine.optimizer is client:  # ZeRO 0 wraps nothing: DeepSpeed calls our optimizer's step itself
            fast_adam_steps(client)
        self.params, self.reducer, self.load_universal, self.client = params, reducer, load_universal, client
        if d.zero_stage == 0 and (reducer is not None or self.engine.world_size == 1):
            # Ours instead, or none at all: on one rank DeepSpeed would still flatten every gradient into a
            # buffer, all-reduce it with itself and copy it back.
            self.engine.enable_backward_allreduce = False
        self.module = self.engine.module  # the same object the Trainer holds, now possibly in half precision
        if d.precision == "bf16":
            autocast_bf16(self.module)
        elif d.precision == "fp16":
            keep_losses_in_fp32(self.module)

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def backward_agreed(self, loss: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
        """Backward and the gradient exchange, with `flags` maxed over ranks (flags[0]: a non-finite loss, whose
        update is then skipped everywhere). With a reducer, one exchange carries both; otherwise DeepSpeed
        reduces the gradients and the flags take one small collective on the device."""
        self.engine.backward(loss)
        if self.reducer is None:
            return distributed.max_over_ranks(flags)
        grads = [p.grad for p in self.params if p.grad is not None]
        return reduce_gradients_and_flags(self.reducer, grads, flags, self.engine.world_size)

    def step(self, skip: torch.Tensor) -> None:
        """At ZeRO 0 (fp32/bf16) DeepSpeed steps our fused Adam itself, which skips on the device (found_inf);
        ZeRO 1/2 and fp16 wrap it in their own optimizers, so there the flag is read on the host first."""
        if self.engine.optimizer is self.client:
            step_on_device(self.client, skip, self.engine.step)
        elif not skip.item():
            self.engine.step()

    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def state_dict(self) -> dict:
        """Weights only, in fp32, for sampling and evaluation; the training state is in `save`'s folder."""
        return {"module": {k: v.float() if v.is_floating_point() else v for k, v in self.module.state_dict().items()},
                "optimizer": None}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])

    def save(self, folder: Path) -> None:
        """Collective: every rank writes its part (ZeRO shards) under `folder`."""
        self.engine.save_checkpoint(str(folder), tag=TAG, save_latest=False)

    def load(self, folder: Path) -> None:
        """Collective: the engine's shards, or the universal conversion of them when the world size changed."""
        tag = UNIVERSAL_TAG if self.load_universal else TAG
        path, _ = self.engine.load_checkpoint(str(folder), tag=tag,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load its checkpoint from {folder}")


def convert_to_universal(folder: Path) -> None:
    """ZeRO 1/2 shards of `folder/ds` -> `folder/ds_universal` (once: the result is cached beside them).

    Needed to resume at another world size; written under a temporary name and renamed, so a conversion
    killed halfway is redone, never half-used. Run it on one rank while the others wait.
    """
    out = folder / UNIVERSAL_TAG
    if out.is_dir():
        return
    tmp = folder / f".{UNIVERSAL_TAG}.tmp"
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(folder / TAG),
           "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", "1",
           "--num_merge_workers", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ds_to_universal failed on {folder}: {r.stderr.strip().splitlines()[-1:]}")
    tmp.replace(out)


def needs_universal(cfg: Config, resume_state: dict | None, world: int) -> bool:
    """Whether resuming `resume_state` needs its ZeRO shards converted: ZeRO 1/2 written at another world size."""
    return resume_state is not None and cfg.dist.zero_stage > 0 and resume_state.get("world", 1) != world


def build_deepspeed_engines(cfg: Config, networks: dict[str, nn.Module], lrs: dict[str, float], rank: int, world: int,
                            resume_state: dict | None = None) -> dict[str, DeepSpeedEngine]:
    """The energy engine and the generator+encoder engine (engine.build_engines). When the checkpoint about to be
    loaded needs a universal conversion, rank 0 converts both engines' shards while the others wait."""
    o, d = cfg.optim, cfg.dist
    universal = needs_universal(cfg, resume_state, world)
    if universal:
        from ddaebm.checkpoint import ENGINES

        if rank == 0:
            for name in ENGINE_NAMES:
                convert_to_universal(Path(resume_state["checkpoint_dir"]) / ENGINES / name)
        distributed.barrier()
    micro = cfg.data.batch // world
    cpu = next(networks["energy"].parameters()).device.type == "cpu"
    reducer = None
    if world > 1 and d.zero_stage == 0 and d.precision != "fp16" and cpu:
        # CPU ranks: one exchange per phase for gradients and flags, through shared memory on one host (GPUs
        # keep DeepSpeed's NCCL all-reduce; ZeRO 1/2 reduce-scatter inside DeepSpeed; fp16 scales its grads).
        reducer = build_reducer(world, rank, d.timeout_s)
    return {name: DeepSpeedEngine(networks[name], lrs[name], o, d, micro, universal, reducer) for name in ENGINE_NAMES}
