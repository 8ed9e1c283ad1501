"""Progress reporting: a tqdm bar on a TTY, one status line per interval otherwise, and `stats.jsonl`.

Per-step scalars are kept as detached tensors and reduced only at the log interval, so the hot loop never
waits on a conversion to Python floats. The stats contract: every value is a 0-dim floating tensor on one device
(the training device), so that one stack and one collective serve all keys; a value elsewhere is a bug, named
at the step that records it. `stats.jsonl` holds one row per logged step: a resumed run first drops the rows
past the step it resumes from (written after that checkpoint by a job that was then killed).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from ddaebm.fsio import write_atomic


class Monitor:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, batch: int, log_every: int,
                 enabled: bool = True, reduce=None):
        """`reduce` averages a tensor of interval means over ranks (all ranks call step_done at the same steps)."""
        self.reduce = reduce
        self.path = Path(run_dir) / "stats.jsonl"
        self.total, self.batch, self.log_every, self.enabled = total_steps, batch, log_every, enabled
        self.pending: dict[str, list[torch.Tensor]] = {}
        self.device: torch.device | None = None  # of the first recorded value; every other must match
        self.t_last, self.step_last = time.perf_counter(), start_step
        if enabled:
            drop_rows_after(self.path, start_step)
        self.bar = None
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="it", dynamic_ncols=True)

    def record(self, stats: dict[str, torch.Tensor]) -> None:
        for key, value in stats.items():
            if self.device is None:
                self.device = value.device
            if value.device != self.device or value.dim() != 0 or not value.is_floating_point():
                raise TypeError(f"stat {key!r} is a {value.dtype} tensor of shape {tuple(value.shape)} on "
                                f"{value.device}; the stats contract is 0-dim floating tensors on {self.device}")
            self.pending.setdefault(key, []).append(value)

    def step_done(self, step: int) -> dict | None:
        """Call after iteration `step` (1-based count of finished iterations); logs at the interval."""
        if self.bar is not None:
            self.bar.update(1)
        if step % self.log_every and step != self.total:
            return None
        now = time.perf_counter()
        row = {"step": step, "kimg": step * self.batch / 1000,
               "sec_per_step": (now - self.t_last) / max(step - self.step_last, 1)}
        means = [torch.stack(values).float().mean() for values in self.pending.values()]
        if self.reduce is not None and means:  # one collective for all keys
            means = list(self.reduce(torch.stack(means)))
        row.update({key: m.item() for key, m in zip(self.pending, means)})
        self.pending.clear()
        self.t_last, self.step_last = now, step
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            self.write(status_line(row, self.total))
        return row

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def drop_rows_after(path: Path, step: int) -> None:
    """Rewrite `path` without the rows whose step is past `step` (unchanged when there are none)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if not line.strip() or json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        write_atomic(path, "".join(line + "\n" for line in kept))


def status_line(row: dict, total: int) -> str:
    keys = ("f_real", "f_fake", "r1_excess", "E_F", "L_lat", "L_rec", "L_KL")
    parts = [f"{k} {row[k]:+.4g}" for k in keys if k in row]
    return (f"step {row['step']}/{total}  kimg {row['kimg']:.1f}  {1000 * row['sec_per_step']:.1f} ms/it  "
            + "  ".join(parts))
