"""Metric rows: every `ddaebm eval` command, and the end-of-run toy evaluation, appends its result as one JSON line
to RUN_DIR/metric-<name>.jsonl (StyleGAN3's metric-*.jsonl) and prints it as a table."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path


def append_row(run_dir: Path, name: str, row: dict) -> None:
    with open(run_dir / f"metric-{name}.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")


def _flatten(row: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in row.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def print_table(title: str, row: dict) -> None:
    flat = _flatten(row)
    width = max(len(k) for k in flat)
    print(title)
    for key, value in flat.items():
        print(f"  {key:<{width}}  {_cell(value)}")


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return "[" + ", ".join(_cell(v) for v in value) + "]"
    return str(value)


def finish(run_dir: Path, name: str, row: dict, t0: float) -> None:
    row["seconds"] = round(time.perf_counter() - t0, 2)
    row["utc"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    append_row(run_dir, name, row)
    print_table(f"{name} of {run_dir} (step {row['step']}) -> {run_dir / f'metric-{name}.jsonl'}", row)


