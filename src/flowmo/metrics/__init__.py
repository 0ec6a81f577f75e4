"""Evaluation metrics (method §7) as torchmetrics: DDP-correct (summed states), never in model checkpoints."""

from flowmo.metrics.codebook import CodebookUsage, bits_per_pixel, index_bits
from flowmo.metrics.fid import FIDFeatures, InceptionFeatures, PairwiseFeatureDistance, RandomConvFeatures, build_fid
from flowmo.metrics.image import (
    PSNR,
    SSIM,
    LPIPSMetric,
    PaperPSNR,
    PaperSSIM,
    psnr_per_image,
    psnr_pooled,
    ssim_gaussian_per_image,
    ssim_skimage_per_image,
    to_unit_range,
    truncate_to_uint8_levels,
)
from flowmo.metrics.reconstruction import ReconstructionMetrics

__all__ = [
    "CodebookUsage",
    "FIDFeatures",
    "InceptionFeatures",
    "LPIPSMetric",
    "PSNR",
    "PairwiseFeatureDistance",
    "PaperPSNR",
    "PaperSSIM",
    "RandomConvFeatures",
    "ReconstructionMetrics",
    "SSIM",
    "bits_per_pixel",
    "build_fid",
    "index_bits",
    "psnr_per_image",
    "psnr_pooled",
    "ssim_gaussian_per_image",
    "ssim_skimage_per_image",
    "to_unit_range",
    "truncate_to_uint8_levels",
]
