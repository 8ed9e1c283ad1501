"""The DDAEBM trainer: a model, its engines, the phases and the state that a checkpoint must carry.

One iteration draws a StepBatch (method.md §5), then runs the phases in order. Each phase is data: a name, the
engine it trains, its loss and its interval. Only the phase's network has requires_grad on, and each
engine gets exactly one backward per phase. The losses are one set of Objectives (ddaebm/losses.py), chosen
once here: the generic autograd ones, or the toy fast path's (ddaebm/fastpath, train.fast_path).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ddaebm import fastpath
from ddaebm.config import Config, to_dict
from ddaebm.errors import BadInput
from ddaebm.data.stream import build_stream
from ddaebm.losses import Objectives, StepBatch, draw_step_batch, r1_enabled
from ddaebm.model import Model
from ddaebm.training.ema import EMA
from ddaebm.training.backends import build_engines

LossFn = Callable[["Trainer", StepBatch], tuple[torch.Tensor, dict]]


class RNGWarning(UserWarning):
    """A checkpoint's random state could not be restored exactly (another device type)."""


@dataclass(frozen=True)
class Phase:
    name: str
    engine: str  # key into Trainer.engines
    loss: LossFn
    interval: int = 1


def _energy_phase(t: "Trainer", b: StepBatch):
    return t.objectives.energy_loss(t.energy, t.schedule, b, t.cfg.loss, with_r1=t.cfg.loss.r1_interval == 1)


def _lazy_r1_phase(t: "Trainer", b: StepBatch):
    return t.objectives.lazy_r1_loss(t.energy, t.schedule, b, t.cfg.loss)


def _generator_phase(t: "Trainer", b: StepBatch):
    return t.objectives.generator_loss(t.energy, t.gen_enc, t.schedule, b, t.cfg.loss, t.terms)


def build_phases(cfg: Config) -> list[Phase]:
    """Energy step (R1 folded in unless lazy), the lazy R1 step if any, then the generator+encoder step."""
    phases = [Phase("energy", "energy", _energy_phase)]
    if cfg.loss.r1_interval > 1 and r1_enabled(cfg.loss):
        phases.append(Phase("energy_r1", "energy", _lazy_r1_phase, cfg.loss.r1_interval))
    phases.append(Phase("generator", "generator", _generator_phase))
    return phases


class Trainer:
    """Holds everything one training run mutates; `train_step` is one DDAEBM iteration."""

    def __init__(self, cfg: Config, rank: int = 0, world: int = 1, resume_state: dict | None = None,
                 objectives: Objectives | None = None):
        """`resume_state`: the checkpoint state this trainer will load (its engines may need to prepare for it);
        `objectives`: the losses to train with, by default as train.fast_path selects them."""
        self.cfg, self.rank, self.world = cfg, rank, world
        self.model = Model(cfg)  # seeded: the same initial weights on every rank
        if rank:  # then the global generators (dropout masks) differ per rank; rank 0 keeps the seed's stream
            torch.manual_seed(cfg.train.seed * 1_000_003 + rank)
        self.device, self.terms, self.schedule = self.model.device, self.model.terms, self.model.schedule
        self.energy, self.gen_enc = self.model.energy, self.model.gen_enc
        if objectives is None:
            objectives, self.objectives_note = fastpath.select(cfg)
        else:
            self.objectives_note = objectives.name
        self.objectives = objectives
        self.modules = self.model.networks
        self.engines = build_engines(cfg, self.modules, rank, world, resume_state)
        self.ema = EMA(self.modules, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
        self.model.averaged = self.ema.shadow if self.ema is not None else None
        # for _train_only: module.requires_grad_ walks the module tree, 3 times per iteration
        self._parameters = {name: list(m.parameters()) for name, m in self.modules.items()}
        self._stream, self._stream_state = None, None  # opened on first use: sampling needs no data
        # The same on every rank: each draws the global batch's randomness and keeps its slice (draw_step_batch).
        self.rng = torch.Generator(device=self.device).manual_seed(cfg.train.seed * 7919 + 17)
        self.phases = build_phases(cfg)
        self.nonfinite_total = 0  # iterations with a skipped (NaN/Inf loss) phase, over the whole run
        self.nonfinite_streak = 0  # consecutive such iterations up to now
        self.stop_agreed = False  # whether the last train_step's stop request held on some rank

    @property
    def step(self) -> int:
        return self.model.step

    @step.setter
    def step(self, value: int) -> None:
        self.model.step = value

    @property
    def stream(self):
        """The training data stream, opened on first use at the position a loaded checkpoint recorded."""
        if self._stream is None:
            self._stream = build_stream(self.cfg, self.rank, self.world, self.device)
            if self._stream_state is not None:
                self._stream.load_state_dict(self._stream_state)
        return self._stream

    def learning_rates(self) -> dict[str, float]:
        o = self.cfg.optim
        base = {"energy": o.lr_d, "generator": o.lr_g}
        if o.lr_schedule == "constant":
            return base
        frac = min(self.step / self.cfg.train.steps, 1.0)
        return {k: o.lr_min + (lr - o.lr_min) * 0.5 * (1 + math.cos(math.pi * frac)) for k, lr in base.items()}

    def _train_only(self, engine_name: str) -> None:
        for name, params in self._parameters.items():
            flag = name == engine_name
            for p in params:
                p.requires_grad = flag

    def train_step(self, stop_requested: Callable[[], bool] | None = None) -> dict[str, torch.Tensor]:
        """One iteration: draw the shared batch, run each due phase, update the EMA.

        A phase's non-finite loss and the stop request (`stop_requested`, e.g. a preemption signal seen on this
        rank, asked in the last phase) are flags on the device, agreed by all ranks in the phase's gradient
        exchange; a phase whose agreed flag is set skips its update on the device. The host reads the flags once,
        after the last update (the verdict: `self.stop_agreed`, the non-finite counters), so the GPU never waits
        on the host in between. Every returned stat is a 0-dim tensor on the training device.
        """
        if self.cfg.optim.lr_schedule != "constant":
            for name, lr in self.learning_rates().items():
                self.engines[name].set_lr(lr)
        self._train_only("generator")  # the fake's graph to φ is kept for the generator phase
        b = self._draw()
        stats: dict[str, torch.Tensor] = {}
        agreed = []
        due = [phase for phase in self.phases if self.step % phase.interval == 0]
        for i, phase in enumerate(due):
            engine = self.engines[phase.engine]
            self._train_only(phase.engine)
            loss, phase_stats = phase.loss(self, b)
            stats.update(phase_stats)
            stop = i == len(due) - 1 and stop_requested is not None and bool(stop_requested())
            flags = torch.stack([torch.isfinite(loss.detach()).logical_not().float(),
                                 torch.full((), float(stop), device=loss.device)])
            engine.zero_grad()
            # A NaN/Inf loss on any rank skips this update on all of them (the engines must stay in step).
            flags = engine.backward_agreed(loss, flags)
            # The graph goes now, not when the next phase's loss replaces it: a fused objective's saved
            # activations (several MB for the toy energy step) would otherwise stay through the next phase's forward.
            del loss
            engine.step(flags[0])
            agreed.append(flags)
        if self.ema is not None:
            self.ema.update(self.modules)
        self.step += 1
        nonfinite = torch.stack(agreed).amax(0)  # [any phase skipped, stop]
        skipped, self.stop_agreed = (v > 0 for v in nonfinite.tolist())  # the iteration's one host read
        self.nonfinite_total += skipped
        self.nonfinite_streak = self.nonfinite_streak + 1 if skipped else 0
        stats["nonfinite"] = nonfinite[0]
        if hasattr(self._stream, "decode_errors"):  # image data: undecodable samples skipped so far (on_error=skip)
            stats["decode_errors"] = torch.full((), float(self._stream.decode_errors), device=self.device)
        return stats

    def _draw(self) -> StepBatch:
        x0 = self.stream.next_batch().to(self.device, non_blocking=True)
        if self.cfg.model.channels_last and x0.dim() == 4:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        nce_std = self.cfg.loss.nce_std if self.cfg.loss.nce_weight > 0 else None
        return draw_step_batch(x0, self.schedule, self.gen_enc.generator, self.terms,
                               self.cfg.model.nz, self.rng, self.rank, self.world, nce_std,
                               self.cfg.loss.step_probs, self.objectives.generator_forward)

    # ---- what a checkpoint carries: everything a bit-exact continuation needs
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "config": to_dict(self.cfg),
            "engines": {name: e.state_dict() for name, e in self.engines.items()},
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "stream": self._stream.state_dict() if self._stream is not None else self._stream_state,
            "rng": {"step": self.rng.get_state(), "device": self.device.type, "torch": torch.get_rng_state(),
                    "cuda": self._cuda_rng()},
            "nonfinite": {"total": self.nonfinite_total, "streak": self.nonfinite_streak},
            "world": self.world,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        for name, engine in self.engines.items():
            engine.load_state_dict(state["engines"][name])
        if self.ema is not None:
            if state["ema"] is None:
                raise BadInput("checkpoint has no EMA but optim.ema_decay > 0")
            self.ema.load_state_dict(state["ema"])
        self._stream_state = state["stream"]
        if self._stream is not None:
            self._stream.load_state_dict(state["stream"])
        self._load_rng(state["rng"])
        counts = state.get("nonfinite", {})
        self.nonfinite_total, self.nonfinite_streak = counts.get("total", 0), counts.get("streak", 0)

    def _load_rng(self, rng: dict) -> None:
        """The generators' states; a checkpoint of another device type (CPU and CUDA generator states differ)
        resumes with the step generator reseeded from the step, with a warning: not a bit-exact continuation."""
        if rng.get("device", "cpu") == self.device.type:
            self.rng.set_state(rng["step"])
        else:
            warnings.warn(f"the checkpoint's random state is of a {rng.get('device', 'cpu')} generator and this run "
                          f"trains on {self.device.type}: its noise is reseeded (the run continues, not bit-exactly)",
                          RNGWarning, stacklevel=3)
            self.rng.manual_seed(self.cfg.train.seed * 7919 + 17 + self.step)
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and rng.get("cuda") is not None and rng.get("device") == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)  # dropout's noise on the GPU

    def _cuda_rng(self):
        return torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None

    def load_engines(self, checkpoint_dir: Path) -> None:
        """Collective: what the engines keep outside state.pt (ZeRO shards), from a checkpoint folder."""
        from ddaebm.checkpoint import ENGINES

        for name, engine in self.engines.items():
            engine.load(Path(checkpoint_dir) / ENGINES / name)
