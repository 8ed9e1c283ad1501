"""The command line's numbers, checked like the config's (ddaebm/config/ranges.py): argparse `type=`s that refuse a
value out of range with the argument's name, before a subcommand opens a run or writes a file."""

from __future__ import annotations

import argparse
import math

from ddaebm.config.ranges import SEED


def count(lo: int = 1, hi: int | None = None):
    """An integer in [lo, hi] (a number of samples, a batch, a grid side, an interval)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lo or (hi is not None and value > hi):
            allowed = f"in [{lo}, {hi}]" if hi is not None else f"≥ {lo}"
            raise argparse.ArgumentTypeError(f"{value}: must be {allowed}")
        return value

    parse.__name__ = "count"
    return parse


seed = count(int(SEED.lo), int(SEED.hi))
"""A seed: samples and their noise are functions of it (ddaebm/sampling.py), which need it ≥ 0 and in 31 bits."""


def step_size(text: str) -> float:
    """A finite float ≥ 0 (the refinement step s)."""
    value = finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: must be ≥ 0")
    return value


def finite(text: str) -> float:
    """A finite float (a range end, a step size)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text}: must be finite")
    return value
