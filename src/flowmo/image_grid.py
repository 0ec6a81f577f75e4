"""Image grids and PNG files, mirroring `torchvision.utils.make_grid` / `save_image` so the package runs without
torchvision (the CPU build of torch our users install has no matching torchvision; a mismatched one crashes at
import).

Same results as torchvision for the arguments flowmo uses (nrow, padding, pad_value; no normalize/value_range):
images fill the grid row by row, every cell is surrounded by `padding` pixels of `pad_value`, a single image is
returned unpadded, and pixels in [0, 1] become uint8 as floor(clamp(x * 255 + 0.5, 0, 255)).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image


def as_batch(images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """[B, C, H, W], [C, H, W], [H, W] or a list of [C, H, W] -> [B, C, H, W]; one channel is repeated to RGB."""
    batch = torch.stack(list(images)) if isinstance(images, (list, tuple)) else images
    if batch.dim() == 2:
        batch = batch.unsqueeze(0)
    if batch.dim() == 3:
        batch = batch.unsqueeze(0)
    if batch.dim() != 4:
        raise ValueError(f"expected images as [B, C, H, W] or [C, H, W], got shape {tuple(batch.shape)}")
    if batch.shape[1] == 1:  # grayscale is shown as RGB, like torchvision
        batch = batch.repeat(1, 3, 1, 1)
    return batch


def make_grid(images: torch.Tensor | Sequence[torch.Tensor], nrow: int = 8, padding: int = 2,
              pad_value: float = 0.0) -> torch.Tensor:
    """Images -> one [C, rows * (H + padding) + padding, cols * (W + padding) + padding] tensor.

    `nrow` images per row (fewer when there are fewer images); the last row may be partly empty (pad_value).
    """
    batch = as_batch(images)
    count, channels, height, width = batch.shape
    if count == 1:  # torchvision returns a lone image as it is, without a frame
        return batch[0]
    columns = min(nrow, count)
    rows = math.ceil(count / columns)
    cell_height, cell_width = height + padding, width + padding
    grid = batch.new_full((channels, rows * cell_height + padding, columns * cell_width + padding), pad_value)
    for index, image in enumerate(batch):
        top = (index // columns) * cell_height + padding
        left = (index % columns) * cell_width + padding
        grid[:, top:top + height, left:left + width] = image
    return grid


def to_uint8_pixels(image: torch.Tensor) -> torch.Tensor:
    """[C, H, W] floats in [0, 1] -> [H, W, C] uint8; + 0.5 then truncation rounds to nearest, as torchvision."""
    return image.detach().mul(255).add(0.5).clamp(0, 255).permute(1, 2, 0).to("cpu", torch.uint8)


def save_image(images: torch.Tensor | Sequence[torch.Tensor], path: str | Path, nrow: int = 8,
               padding: int = 2) -> None:
    """Write images in [0, 1] as one image file (format from the suffix, e.g. .png), gridded as make_grid."""
    grid = make_grid(images, nrow=nrow, padding=padding)
    Image.fromarray(to_uint8_pixels(grid).numpy()).save(path)
