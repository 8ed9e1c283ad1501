"""Model space to pixels: what the networks output, as uint8 images for grids, .npz batches and FID."""

from __future__ import annotations

import math

import numpy as np
import torch


def to_uint8(x: torch.Tensor, preprocess: str) -> np.ndarray:
    """Samples in model space -> uint8 images [N, H, W, C].

    'minus_one_one': [N, C, H, W] in [−1, 1] (method.md §7.1: map to [0, 1]); 'logit': flat logit pixels of a square
    one-channel image (MNIST NICE, method.md §7.5), undone by a sigmoid.
    """
    x = x.detach().float().cpu()
    if preprocess == "logit":
        side = math.isqrt(x.shape[1])
        if side * side != x.shape[1]:
            raise ValueError(f"logit samples of dimension {x.shape[1]} are not square images")
        x = torch.sigmoid(x).reshape(-1, 1, side, side)
    elif preprocess == "minus_one_one":
        x = (x + 1) / 2
    else:
        raise ValueError(f"unknown preprocess {preprocess!r}")
    pixels = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().numpy()


def image_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 [N, H, W, C] -> one uint8 [rows·(H+pad)+pad, nrow·(W+pad)+pad, C] mosaic (no torchvision here)."""
    n, h, w, c = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = images[i]
    return grid


def save_grid(path, images: np.ndarray, nrow: int | None = None) -> None:
    from PIL import Image

    grid = image_grid(images, nrow)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
