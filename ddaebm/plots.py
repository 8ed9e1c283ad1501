"""PNG figures for the run directory: sample scatter plots and normalised energy densities (method.md §7.3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ddaebm.sampling import normalised_density


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_scatter(path: Path, samples: np.ndarray, lo: float, hi: float, title: str = "") -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    ax.scatter(samples[:, 0], samples[:, 1], s=1, alpha=0.5, linewidths=0)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_density(path: Path, log_density: np.ndarray, lo: float, hi: float, title: str = "") -> None:
    """The grid density exp(f) normalised over the grid, origin lower (row i is y = side[i])."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    ax.imshow(normalised_density(log_density), origin="lower", extent=(lo, hi, lo, hi), cmap="viridis")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
