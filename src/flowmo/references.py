"""Codecs that cost nothing to train: the scale against which the demo and an ablation table read a tokenizer's
reconstructions. Each returns reconstructions in [-1, 1] and says its rate in bits per pixel.

- the mean colour of each image (3 bytes per image);
- a grid x grid average pool, nearest-neighbour upsampled, at 8 bits per value;
- the equal-bit thumbnail: the same pool with each value uniformly quantised so that the thumbnail costs no more
  bits per pixel than the tokenizer it is compared with (does the tokenizer beat a thumbnail at its own rate?).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

POOL_GRID = 8  # the 8x8 average-pool reference: 8*8*3 = 192 numbers per image


def mean_colour(images: torch.Tensor) -> torch.Tensor:
    """Each image replaced by its mean colour: the trivial guess a tokenizer must beat."""
    return images.mean(dim=(2, 3), keepdim=True).expand_as(images)


def pool_reference(images: torch.Tensor, grid: int = POOL_GRID) -> torch.Tensor:
    """grid x grid average pool, nearest-neighbour upsampled: what grid*grid*3 numbers per image give."""
    return F.interpolate(F.adaptive_avg_pool2d(images, grid), size=images.shape[-2:], mode="nearest")


def quantise(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Uniform quantisation of [-1, 1] to 2^bits levels (cell centres), values clamped first."""
    levels = 2**bits
    index = ((values.clamp(-1, 1) + 1) / 2 * levels).floor().clamp(max=levels - 1)
    return (index + 0.5) / levels * 2 - 1


def pool_bits_per_pixel(image_size: int, grid: int = POOL_GRID, bits: int = 8) -> float:
    return 3 * grid * grid * bits / image_size**2


def equal_bit_bits(bits_per_pixel: float, image_size: int, grid: int = POOL_GRID) -> int:
    """Bits per pooled value such that the thumbnail costs at most `bits_per_pixel` (at least 1, at most 8)."""
    budget = bits_per_pixel * image_size**2 / (3 * grid * grid)
    if budget < 1:
        raise ValueError(f"{bits_per_pixel} bits per pixel cannot pay one bit per value of a {grid}x{grid} pool of a "
                         f"{image_size}px image; use a smaller grid.")
    return min(8, math.floor(budget + 1e-9))


def equal_bit_thumbnail(images: torch.Tensor, bits_per_pixel: float,
                        grid: int = POOL_GRID) -> tuple[torch.Tensor, float]:
    """The pool reference at (at most) the tokenizer's rate: (reconstructions, bits per pixel used)."""
    size = images.shape[-1]
    bits = equal_bit_bits(bits_per_pixel, size, grid)
    pooled = quantise(F.adaptive_avg_pool2d(images, grid), bits)
    return F.interpolate(pooled, size=images.shape[-2:], mode="nearest"), pool_bits_per_pixel(size, grid, bits)
