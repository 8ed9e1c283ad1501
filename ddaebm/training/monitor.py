"""Progress reporting: a tqdm bar on a TTY, one status line per interval otherwise, and `stats.jsonl`.

Per-step scalars are kept as detached tensors and reduced only at the log interval, so the hot loop never
waits on a conversion to Python floats.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch


class Monitor:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, batch: int, log_every: int,
                 enabled: bool = True, reduce=None):
        """`reduce` averages a tensor of interval means over ranks (all ranks call step_done at the same steps)."""
        self.reduce = reduce
        self.path = Path(run_dir) / "stats.jsonl"
        self.total, self.batch, self.log_every, self.enabled = total_steps, batch, log_every, enabled
        self.pending: dict[str, list[torch.Tensor]] = {}
        self.t_last, self.step_last = time.perf_counter(), start_step
        self.bar = None
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="it", dynamic_ncols=True)

    def record(self, stats: dict[str, torch.Tensor]) -> None:
        for key, value in stats.items():
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


def status_line(row: dict, total: int) -> str:
    keys = ("f_real", "f_fake", "r1_excess", "E_F", "L_lat", "L_rec", "L_KL")
    parts = [f"{k} {row[k]:+.4g}" for k in keys if k in row]
    return (f"step {row['step']}/{total}  kimg {row['kimg']:.1f}  {1000 * row['sec_per_step']:.1f} ms/it  "
            + "  ".join(parts))
