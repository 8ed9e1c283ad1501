"""The DeepSpeed backend: one DeepSpeed engine per player, behind TorchEngine's surface.

Imported only when `dist.backend=deepspeed`, so the single-process path never loads DeepSpeed. The losses call
the networks directly (`engine.module(x)`, never `engine(x)`): the R1 penalty differentiates the energy with
`autograd.grad(create_graph=True)` and the generator's loss runs through the frozen energy, and calling the
engine there breaks DeepSpeed's backward bookkeeping (STACK_NOTES). Each engine gets one backward per phase.
EMA lives outside the engines (ddaebm/training/ema.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from ddaebm.config import DistConfig, OptimConfig
from ddaebm.training.precision import autocast_bf16, keep_losses_in_fp32

TAG = "ds"
UNIVERSAL_TAG = "ds_universal"


def ds_config(lr: float, o: OptimConfig, d: DistConfig, micro_batch: int, load_universal: bool) -> dict:
    """The engine config: Adam(β1, β2) without weight decay (SPEC §5), ZeRO stage, precision, clipping."""
    # torch_adam builds torch AdamW, whose default weight decay is 0.01: 0.0 makes it Adam (STACK_NOTES).
    adam = {"lr": lr, "betas": [o.beta1, o.beta2], "eps": o.adam_eps, "weight_decay": 0.0, "torch_adam": True}
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "Adam", "params": adam},
        "zero_optimization": {"stage": d.zero_stage},
        "gradient_clipping": d.grad_clip,
        "steps_per_print": 2**31 - 1,
        "checkpoint": {"load_universal": load_universal},
    }
    if d.precision == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return cfg


class DeepSpeedEngine:
    """A network in a DeepSpeed engine with TorchEngine's surface, plus save/load to a checkpoint folder."""

    def __init__(self, module: nn.Module, lr: float, o: OptimConfig, d: DistConfig, micro_batch: int,
                 load_universal: bool = False):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        if d.precision == "fp16" and not get_accelerator().is_fp16_supported():
            raise ValueError("dist.precision=fp16: this device has no fp16 support in DeepSpeed; use bf16 or fp32")
        params = [p for p in module.parameters() if p.requires_grad]
        self.engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=params,
                                                    config=ds_config(lr, o, d, micro_batch, load_universal))
        self.module = self.engine.module  # the same object the Trainer holds, now possibly in half precision
        if d.precision == "bf16":
            autocast_bf16(self.module)
        elif d.precision == "fp16":
            keep_losses_in_fp32(self.module)

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
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

    def load(self, folder: Path, universal: bool = False) -> None:
        path, _ = self.engine.load_checkpoint(str(folder), tag=UNIVERSAL_TAG if universal else TAG,
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


def build_deepspeed_engines(t, load_universal: bool = False) -> dict[str, DeepSpeedEngine]:
    """Trainer engine_factory: the energy engine and the generator+encoder engine."""
    o, d = t.cfg.optim, t.cfg.dist
    micro = t.cfg.data.batch // t.world
    return {"energy": DeepSpeedEngine(t.energy, o.lr_d, o, d, micro, load_universal),
            "generator": DeepSpeedEngine(t.gen_enc, o.lr_g, o, d, micro, load_universal)}
