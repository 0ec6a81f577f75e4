"""flowmo.image_grid: the same grids and PNG files as torchvision's make_grid / save_image, without torchvision."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowmo.image_grid import make_grid, save_image

SRC = Path(__file__).resolve().parents[1] / "src"


def pixels(batch=5, channels=3, height=6, width=4, seed=0):
    """Values a little outside [0, 1] too, to exercise the clamp of save_image."""
    return torch.rand(batch, channels, height, width, generator=torch.Generator().manual_seed(seed)) * 1.2 - 0.1


def read_png(path):
    return np.array(Image.open(path))


@pytest.mark.parametrize("batch", [1, 2, 5, 8, 9])
@pytest.mark.parametrize("nrow", [1, 3, 8])
@pytest.mark.parametrize("padding", [0, 2, 3])
def test_make_grid_equals_torchvision(batch, nrow, padding):
    tv_utils = pytest.importorskip("torchvision.utils")
    images = pixels(batch)
    for pad_value in (0.0, 1.0):
        expected = tv_utils.make_grid(images, nrow=nrow, padding=padding, pad_value=pad_value)
        assert torch.equal(make_grid(images, nrow=nrow, padding=padding, pad_value=pad_value), expected)


def test_make_grid_equals_torchvision_for_other_input_shapes():
    tv_utils = pytest.importorskip("torchvision.utils")
    gray = pixels(4, channels=1)
    for images in (gray, gray[0], gray[0, 0], pixels(1)[0], list(pixels(3))):
        assert torch.equal(make_grid(images, nrow=2), tv_utils.make_grid(images, nrow=2))


@pytest.mark.parametrize("batch, nrow, padding", [(1, 8, 2), (3, 8, 2), (6, 4, 0), (7, 3, 5)])
def test_save_image_writes_torchvision_pixels(tmp_path, batch, nrow, padding):
    tv_utils = pytest.importorskip("torchvision.utils")
    images = pixels(batch)
    images[0, 0, 0, :3] = torch.tensor([0.5 / 255, 127.5 / 255, 254.5 / 255])  # rounding ties
    save_image(images, tmp_path / "ours.png", nrow=nrow, padding=padding)
    tv_utils.save_image(images, tmp_path / "torchvision.png", nrow=nrow, padding=padding)
    assert np.array_equal(read_png(tmp_path / "ours.png"), read_png(tmp_path / "torchvision.png"))
    save_image(images[0], tmp_path / "one.png")
    tv_utils.save_image(images[0], tmp_path / "tv_one.png")
    assert np.array_equal(read_png(tmp_path / "one.png"), read_png(tmp_path / "tv_one.png"))


def test_grid_layout_and_padding_pixels():
    images = torch.stack([torch.full((3, 4, 5), float(k)) for k in range(1, 6)])  # image k is filled with k
    grid = make_grid(images, nrow=3, padding=2, pad_value=-1.0)
    assert grid.shape == (3, 2 * (4 + 2) + 2, 3 * (5 + 2) + 2)  # 2 rows of 3 cells, a frame around each
    for k in range(5):
        top, left = 2 + (k // 3) * 6, 2 + (k % 3) * 7
        assert torch.equal(grid[:, top:top + 4, left:left + 5], images[k])
    filled = torch.zeros(grid.shape[1:], dtype=torch.bool)
    for k in range(5):
        top, left = 2 + (k // 3) * 6, 2 + (k % 3) * 7
        filled[top:top + 4, left:left + 5] = True
    assert (grid[:, ~filled] == -1.0).all()  # frames and the empty sixth cell
    assert torch.equal(make_grid(images[:1], padding=2), images[0])  # one image: no frame
    assert make_grid(images, nrow=10, padding=0).shape == (3, 4, 5 * 5)  # fewer images than nrow: one row


def test_saved_png_round_trips_to_nearest_uint8(tmp_path):
    images = pixels(4, height=5, width=3, seed=1)
    save_image(images, tmp_path / "grid.png", nrow=2, padding=1)
    saved = read_png(tmp_path / "grid.png")
    assert saved.shape == (2 * 6 + 1, 2 * 4 + 1, 3) and saved.dtype == np.uint8
    expected = (images[3].clamp(0, 1) * 255).round().permute(1, 2, 0).to(torch.uint8).numpy()
    assert np.array_equal(saved[7:12, 5:8], expected)  # the fourth image: second row, second column
    assert (saved[0] == 0).all() and (saved[:, 0] == 0).all()  # save_image pads with black
    ties = torch.tensor([0.5, 127.5, 254.5, 300.0, -4.0]).div(255).view(1, 1, 5).expand(3, 1, 5)
    save_image(ties, tmp_path / "ties.png")
    assert read_png(tmp_path / "ties.png")[0, :, 0].tolist() == [1, 128, 255, 255, 0]  # ties round up


def test_grid_writers_import_without_torchvision():
    """Hide torchvision as an install without it does: no module and no metadata (torchmetrics reads that)."""
    script = textwrap.dedent("""
        import importlib.metadata as metadata, sys
        sys.modules["torchvision"] = None
        def hiding_torchvision(lookup):
            def wrapped(name, *args, **kwargs):
                if name == "torchvision":
                    raise metadata.PackageNotFoundError(name)
                return lookup(name, *args, **kwargs)
            return wrapped
        metadata.version = hiding_torchvision(metadata.version)
        metadata.distribution = hiding_torchvision(metadata.distribution)
        import flowmo.image_grid, flowmo.data.transforms, flowmo.callbacks.images, flowmo.callbacks.report
        import flowmo.generate.sample, flowmo.generate.module
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
