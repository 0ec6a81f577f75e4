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

from flowmo.metrics.image import PSNR, SSIM, PaperPSNR, PaperSSIM

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
        raise ValueError(
            f"{bits_per_pixel} bits per pixel cannot pay one bit per value of a {grid}x{grid} pool of a "
            f"{image_size}px image; use a smaller grid."
        )
    return min(8, math.floor(budget + 1e-9))


def equal_bit_thumbnail(
    images: torch.Tensor, bits_per_pixel: float, grid: int = POOL_GRID
) -> tuple[torch.Tensor, float]:
    """The pool reference at (at most) the tokenizer's rate: (reconstructions, bits per pixel used)."""
    size = images.shape[-1]
    bits = equal_bit_bits(bits_per_pixel, size, grid)
    pooled = quantise(F.adaptive_avg_pool2d(images, grid), bits)
    return F.interpolate(pooled, size=images.shape[-2:], mode="nearest"), pool_bits_per_pixel(size, grid, bits)


class ReferenceScores:
    """PSNR and SSIM (per image, and the paper's pooled variants) of the three references on the images a test
    sees, batch by batch like the tokenizer's own metrics: the rows an ablation table reads a cell against.
    Every codec is set up front, so under DDP every rank takes part in each metric's reduction."""

    def __init__(self, bits_per_pixel: float, image_size: int, device: torch.device | str = "cpu") -> None:
        self.image_size = image_size
        self.rates = {"mean_colour": pool_bits_per_pixel(image_size, grid=1), "pool8": pool_bits_per_pixel(image_size)}
        self.labels = {
            "mean_colour": "mean colour of each image (8 bits per channel)",
            "pool8": f"{POOL_GRID}x{POOL_GRID} average pool (8 bits per value)",
        }
        self.equal_bit = None  # the tokenizer's rate, where it pays at least one bit per pooled value
        if math.isfinite(bits_per_pixel):  # a continuous code has no rate to match
            try:
                bits = equal_bit_bits(bits_per_pixel, image_size)
            except ValueError:
                bits = None  # too few bits per pixel for the pool: no equal-bit row
            if bits is not None:
                self.equal_bit = bits_per_pixel
                self.rates["equal_bit"] = pool_bits_per_pixel(image_size, POOL_GRID, bits)
                self.labels["equal_bit"] = f"equal-bit thumbnail ({POOL_GRID}x{POOL_GRID} pool, {bits} bits per value)"
        self.metrics = {
            name: {"psnr": PSNR(), "psnr_paper": PaperPSNR(), "ssim": SSIM(), "ssim_paper": PaperSSIM()}
            for name in self.labels
        }
        for metrics in self.metrics.values():
            for metric in metrics.values():
                metric.to(device)

    def _codecs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        codecs = {"mean_colour": mean_colour(images), "pool8": pool_reference(images)}
        if self.equal_bit is not None:
            codecs["equal_bit"] = equal_bit_thumbnail(images, self.equal_bit)[0]
        return codecs

    def update(self, images: torch.Tensor) -> None:
        if images.shape[-1] != self.image_size:
            raise ValueError(f"reference codecs set up for {self.image_size}px images got {images.shape[-1]}px ones")
        for name, reconstruction in self._codecs(images.float()).items():
            for metric in self.metrics[name].values():
                metric.update(reconstruction, images)

    def compute(self) -> dict[str, dict]:
        """{codec: {label, bits_per_pixel, psnr, psnr_paper, ssim, ssim_paper}}; a collective under DDP (every
        rank calls it); empty when no image of the set-up size was seen."""
        scores = {}
        for name, metrics in self.metrics.items():
            if int(metrics["psnr"].score_count) == 0 and not torch.distributed.is_initialized():
                continue  # no image of this size here: nothing to report (nan otherwise)
            values = {key: float(metric.compute()) for key, metric in metrics.items()}
            if not math.isnan(values["psnr"]):
                scores[name] = {"label": self.labels[name], "bits_per_pixel": self.rates[name], **values}
        return scores
