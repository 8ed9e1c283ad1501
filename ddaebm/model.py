"""The model handle: networks, schedule and config; what sampling, densities and every evaluation need.

A `Model` holds the energy f_θ, the generator+encoder, their EMA copies when the run keeps them, the diffusion
schedule and the config, and nothing of training (no optimizers, data stream or RNG state). It is built empty
for a new run (the trainer trains its networks in place) or restored from a run directory or a checkpoint
(`Model.from_run`, `Model.from_checkpoint`); `sample`, `density`, the snapshots and every `ddaebm eval` take one.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ddaebm import distributed
from ddaebm.config import Config, config_from_dict
from ddaebm.data.stream import build_stream, data_shape, is_toy
from ddaebm.diffusion.schedule import build_schedule
from ddaebm.errors import BadInput
from ddaebm.losses import ABLATIONS, draw_generator_inputs
from ddaebm.networks import build_energy, build_generator_encoder
from ddaebm.sampling import energy_grid, grid_side, precise_bn, refine, sample, sample_indexed

PRECISE_BN_SEED = 1_000_033  # the precise-BN batches' noise: fixed, so samples of a run are reproducible


def averaged_copy(module: nn.Module) -> nn.Module:
    """An EMA shadow of `module`: an fp32 copy without gradients, in eval mode (a half-precision average would
    lose small updates)."""
    return copy.deepcopy(module).float().requires_grad_(False).eval()


class Model:
    """Networks + schedule + config. `averaged` maps 'energy'/'generator' to the EMA copies, or is None."""

    def __init__(self, cfg: Config, device: torch.device | None = None):
        self.cfg = cfg
        self.device = distributed.resolve_device(cfg.dist.device) if device is None else device
        self.terms = ABLATIONS[cfg.loss.ablation]
        self.schedule = build_schedule(cfg.diffusion).to(self.device)
        self.data_shape = data_shape(cfg)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.energy = self._placed(build_energy(cfg.model, cfg.diffusion.num_steps))
        # model.mlp_skip's gains start at √ᾱ_{k+1}: E[x₀ | x_{k+1}] ≈ √ᾱ_{k+1}·x_{k+1} for unit-variance data.
        self.gen_enc = self._placed(build_generator_encoder(cfg.model, self.terms.encoder, cfg.diffusion.num_steps,
                                                            self.schedule.alpha_bar[1:].sqrt().tolist()))
        self.averaged: dict[str, nn.Module] | None = None
        self.step = 0
        self._precise_bn = None  # (source, its tensors' versions, result) of the last sampling_generator call

    def _placed(self, module: nn.Module) -> nn.Module:
        module = module.to(self.device)
        if self.cfg.model.channels_last and len(self.data_shape) == 3:
            module = module.to(memory_format=torch.channels_last)
        return module

    @property
    def networks(self) -> dict[str, nn.Module]:
        """The raw networks by the names checkpoints and engines use."""
        return {"energy": self.energy, "generator": self.gen_enc}

    # ---- restoring

    @classmethod
    def from_state(cls, state: dict, device: torch.device | None = None) -> "Model":
        """The model of a checkpoint's state (its config, raw weights and EMA), on `device` (default: the
        config's dist.device)."""
        if "config" not in state or "engines" not in state:
            raise BadInput("checkpoint state lacks its config or weights")
        cfg = config_from_dict(state["config"])
        if device is None and cfg.dist.device == "cuda" and not torch.cuda.is_available():
            device = torch.device("cpu")  # a run trained on GPUs, opened where there are none
        model = cls(cfg, device)
        try:
            for name, module in model.networks.items():
                module.load_state_dict(state["engines"][name]["module"])
            if state.get("ema") is not None:
                model.averaged = {name: averaged_copy(m) for name, m in model.networks.items()}
                for name, module in model.averaged.items():
                    module.load_state_dict(state["ema"][name])
        except (KeyError, TypeError, RuntimeError) as err:  # a sealed checkpoint whose weights are not its config's
            raise BadInput(f"checkpoint of step {state.get('step')}: its weights do not fit its config "
                           f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
        model.step = state["step"]
        return model

    @classmethod
    def from_checkpoint(cls, path: Path, device: torch.device | None = None) -> "Model":
        """The model of one checkpoint folder (verified against its manifest when it has one, with a warning when
        not) or state file, read without running code (ddaebm/checkpoint/state.py)."""
        import warnings

        from ddaebm.checkpoint import MANIFEST, CheckpointWarning, load_state, verify_checkpoint

        path = Path(path)
        if path.is_dir() and (path / MANIFEST).is_file():
            return cls.from_state(verify_checkpoint(path), device)
        warnings.warn(f"{path}: no {MANIFEST} beside it, so its files cannot be checked", CheckpointWarning,
                      stacklevel=2)
        return cls.from_state(load_state(path), device)

    @classmethod
    def from_run(cls, run_dir: Path, device: torch.device | None = None) -> "Model":
        """The model of the newest checkpoint of `run_dir` that verifies, by the rule resuming uses: a damaged
        newest one is skipped with a warning, one that would run code is refused, and a run whose checkpoints
        all fail to verify is an error."""
        from ddaebm.checkpoint import newest_valid_checkpoint

        found = newest_valid_checkpoint(run_dir)
        if found is None:
            raise BadInput(f"{run_dir}: no checkpoint found")
        return cls.from_state(found[1], device)

    # ---- what to sample and score with

    def sampling_networks(self, use_ema: bool = True) -> tuple[nn.Module, nn.Module]:
        """(generator+encoder, energy) to sample and score with: the EMA copies when kept and asked for."""
        if use_ema and self.averaged is not None:
            return self.averaged["generator"], self.averaged["energy"]
        return self.gen_enc, self.energy

    def sampling_generator(self, use_ema: bool = True) -> nn.Module:
        """The generator to sample with (the EMA copy when kept), with BatchNorm statistics recomputed over
        sample.precise_bn_batches training-like batches where sampling reads them (model.sample_bn_mode=eval).

        Averaged weights get statistics of their own this way, which the EMA copy otherwise lacks (it carries
        the raw network's)."""
        generator = self.sampling_networks(use_ema)[0].generator
        if self.cfg.sample.precise_bn_batches == 0 or self.cfg.model.sample_bn_mode == "train":
            return generator
        # Kept while the source's tensors are unchanged (their version counters: in-place updates, EMA's
        # included, and loads move them), so an evaluation's several sampling calls recompute it once.
        versions = tuple(t._version for t in generator.state_dict(keep_vars=True).values())
        cached = self._precise_bn
        if cached is None or cached[0] is not generator or cached[1] != versions:
            batches = self._generator_inputs(self.cfg.sample.precise_bn_batches)
            cached = self._precise_bn = (generator, versions, precise_bn(generator, batches))
        return cached[2]

    def _generator_inputs(self, num_batches: int):
        """(x_{k+1}, k, z) batches as training draws them (k by loss.step_probs), from a fresh data stream and a
        fixed seed: the same batches at every call, and a training's own stream and RNG do not move."""
        stream = build_stream(self.cfg, device=self.device)
        rng = torch.Generator(device=self.device).manual_seed(PRECISE_BN_SEED)
        for _ in range(num_batches):
            k, _, x_k1, z, _ = draw_generator_inputs(stream.next_batch().to(self.device), self.schedule,
                                                     self.terms.latent, self.cfg.model.nz, rng,
                                                     step_probs=self.cfg.loss.step_probs)
            yield x_k1, k, z

    # ---- sampling and densities

    def set_refine_step(self, step: float | None) -> None:
        """Refine samples with step size `step` from now on (None: keep the run's sample.refine_step)."""
        if step is not None:
            self.cfg = dataclasses.replace(self.cfg, sample=dataclasses.replace(self.cfg.sample, refine_step=step))

    def generate(self, num: int, seed: int, refine_samples: bool = False, use_ema: bool | None = None,
                 indices=None, batch: int = 10_000) -> torch.Tensor:
        """num samples (on the model's device), optionally energy-refined (method.md §7.1, §7.2).

        use_ema: the EMA generator (and energy, for refinement) when kept; None follows sample.use_ema. Image and
        NICE models draw sample i from its own seed (sampling.sample_indexed): `indices` picks which samples.
        """
        use_ema = self.cfg.sample.use_ema if use_ema is None else use_ema
        generator, (_, energy) = self.sampling_generator(use_ema), self.sampling_networks(use_ema)
        m = self.cfg.model
        if is_toy(self.cfg):
            x = sample(generator, self.schedule, num, self.data_shape, m.nz, torch.Generator().manual_seed(seed),
                       use_latent=self.terms.latent, bn_train=m.sample_bn_mode == "train")
        else:
            indices = range(num) if indices is None else indices
            x = torch.cat([sample_indexed(generator, self.schedule, indices[i:i + batch], seed, self.data_shape,
                                          m.nz, self.device, self.terms.latent)
                           for i in range(0, len(indices), batch)])
        return refine(energy, x, self.cfg.sample.refine_step) if refine_samples else x

    def density(self, grid: int, lo: float, hi: float, use_ema: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(side, f(x, k=0) on the grid) (method.md §7.3); use_ema None follows eval.energy_ema."""
        side = grid_side(lo, hi, grid)
        _, energy = self.sampling_networks(self.cfg.eval.energy_ema if use_ema is None else use_ema)
        return side, energy_grid(energy, side)
