"""Model space to uint8 pixels, and the grid writer."""

import numpy as np
import pytest
import torch

from ddaebm.data.pixels import image_grid, save_grid, to_uint8


def test_minus_one_one_maps_to_0_255_nhwc():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2).repeat(1, 3, 1, 1)
    out = to_uint8(x, "minus_one_one")
    assert out.shape == (1, 2, 2, 3) and out.dtype == np.uint8
    assert out[0, :, :, 0].ravel().tolist() == [0, 128, 255, 255]


def test_logit_is_undone_by_sigmoid():
    p = torch.rand(2, 784) * 0.98 + 0.01
    out = to_uint8(torch.logit(p), "logit")
    assert out.shape == (2, 28, 28, 1)
    assert np.abs(out[..., 0].reshape(2, -1).astype(float) - p.numpy() * 255).max() <= 0.5 + 1e-3
    with pytest.raises(ValueError, match="not square"):
        to_uint8(torch.zeros(1, 10), "logit")


def test_grid_places_images_row_major(tmp_path):
    imgs = np.stack([np.full((4, 4, 1), v, np.uint8) for v in (10, 20, 30)])
    grid = image_grid(imgs, nrow=2, pad=1)
    assert grid.shape == (1 + 2 * 5, 1 + 2 * 5, 1)
    assert grid[1, 1, 0] == 10 and grid[1, 6, 0] == 20 and grid[6, 1, 0] == 30 and grid[6, 6, 0] == 255
    save_grid(tmp_path / "g.png", imgs)
    assert (tmp_path / "g.png").stat().st_size > 0
