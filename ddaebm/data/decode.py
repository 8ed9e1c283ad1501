"""What both loaders do to one encoded image (method.md §8): the `Transform` (decode to `channels`, resize the shorter
side and centre-crop when needed, optional flip, normalise) and its PIL reference implementation, plus the logit
input of the NICE path (method.md §7.5). DALI (ddaebm/data/dali.py) builds the same transform as a graph and falls back
to `decode_pil` to name the samples it cannot decode.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch

from ddaebm.errors import BadValue

PREPROCESS = ("minus_one_one", "logit")


@dataclass(frozen=True)
class Transform:
    """What both loaders do to an encoded image (method.md §8): decode to `channels`, resize the shorter side to
    `resolution` and centre-crop when the stored size is not resolution², optional flip, normalise."""

    resolution: int
    channels: int
    resize: bool
    preprocess: str

    @property
    def mean_std(self) -> tuple[float, float]:
        """[−1, 1] images, or [0, 1] pixels that the logit path dequantises afterwards (method.md §7.5)."""
        return (127.5, 127.5) if self.preprocess == "minus_one_one" else (0.0, 255.0)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.resolution, self.resolution)


def make_transform(manifest: dict, resolution: int, channels: int, preprocess: str) -> Transform:
    if preprocess not in PREPROCESS:
        raise BadValue(f"preprocess={preprocess!r}; choose one of {PREPROCESS}")
    if channels not in (1, 3):
        raise BadValue(f"channels={channels}; images have 1 (grayscale) or 3 (RGB)")
    image = manifest["image"]
    stored = (image.get("height"), image.get("width"))
    return Transform(resolution, channels, stored != (resolution, resolution), preprocess)


def resized_size(w: int, h: int, r: int) -> tuple[int, int]:
    """Size after resizing the shorter side to r, rounding the other half up as DALI's `resize_shorter` does."""
    return (r, int(h * r / w + 0.5)) if w <= h else (int(w * r / h + 0.5), r)


def crop_box(w: int, h: int, r: int) -> tuple[int, int, int, int]:
    """The centred r×r box; DALI's centre crop rounds an odd margin's start up."""
    left, top = (w - r + 1) // 2, (h - r + 1) // 2
    return left, top, left + r, top + r


def decode_pil(data: bytes, t: Transform, flip: bool) -> np.ndarray:
    """uint8 C×R×R. PIL's antialiased bilinear resize; DALI's linear antialiased resize differs by a level or two
    on natural images (measured in tests/test_image_data.py); without resize both paths are bit-identical."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("L" if t.channels == 1 else "RGB")
    r = t.resolution
    if t.resize:
        size = resized_size(*im.size, r)
        im = im.resize(size, Image.BILINEAR).crop(crop_box(*size, r))
    elif im.size != (r, r):
        raise BadValue(f"image is {im.size[0]}x{im.size[1]}, the manifest promised {r}x{r}")
    if flip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    a = np.asarray(im)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def normalize(x: torch.Tensor, t: Transform) -> torch.Tensor:
    """(x − mean) · (1/std) in float32, the arithmetic of DALI's `crop_mirror_normalize`."""
    mean, std = t.mean_std
    return (x.float() - mean) * np.float32(1.0 / std)


def logit_pixels(x01: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """NICE's input (method.md §7.5): dequantise pixels in [0, 1], clamp to [1e-3, 1 − 1e-3], logit, flatten."""
    p = (x01.flatten(1) + noise.to(x01.device)).clamp(1e-3, 1 - 1e-3)
    return torch.log(p) - torch.log1p(-p)
