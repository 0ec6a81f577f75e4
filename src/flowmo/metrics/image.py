"""Per-image reconstruction metrics as torchmetrics (method §7): PSNR, SSIM, LPIPS, each in two flavours.

Every ``update(preds, target)`` takes torchmetrics' order: the reconstructions, then the originals, float images
[B, 3, H, W]. ``data_range`` says the span of the images: (-1, 1) by default (the tokenizer's images, width 2), a
float d for [0, d] (1.0: [0, 1] images, 255.0: uint8 values), or a pair (low, high). Images are clamped to that span
first (a reconstruction may overshoot; saved images are clamped too) and mapped to [0, 1], so the default gives
today's numbers and ``PSNR(data_range=1.0)`` on [0, 1] images equals torchmetrics' PSNR(data_range=1.0).

- ``PSNR`` / ``SSIM``: the correct ones on float images, per image, then the mean over images. SSIM is
  the standard one of Wang et al. (Gaussian window, sigma 1.5, population covariance, valid region).
- ``PaperPSNR`` / ``PaperSSIM``: match the authors' evaluation (method §7) to reproduce the reported numbers:
  images truncated to uint8 (x255 then cast, no rounding) and back to [0, 1]; SSIM as scikit-image's
  ``structural_similarity(a, b, data_range=1, channel_axis=-1)`` (7x7 uniform window, sample covariance);
  PSNR from the MSE pooled over each ``update`` batch (the paper's batches hold 5 images), averaged over
  batches.
- ``LPIPSMetric``: LPIPS (AlexNet or VGG) on [-1, 1] inputs, averaged per image.

All states are sums with ``dist_reduce_fx="sum"``, so DDP gives the single-process value; no state is
persistent, so metrics add nothing to model checkpoints.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric

from flowmo.perceptual import LPIPSDistance, check_image_pair

SKIMAGE_WINDOW = 7  # scikit-image's default win_size when gaussian_weights=False
SSIM_K1, SSIM_K2 = 0.01, 0.03
GAUSSIAN_SIGMA, GAUSSIAN_RADIUS = 1.5, 5  # scikit-image / scipy: radius int(3.5 * sigma + 0.5)


# ----------------------------------------------------------------------------------------------------------
# Conversions and functional forms ([0, 1] images, data range 1)


DataRange = float | tuple[float, float]
SIGNED = (-1.0, 1.0)  # the tokenizer's images


def span(data_range: DataRange) -> tuple[float, float]:
    """(low, high) of a data_range: a float d is [0, d] (torchmetrics' float form), a pair is itself."""
    low, high = (0.0, float(data_range)) if isinstance(data_range, (int, float)) else map(float, data_range)
    if not high > low:
        raise ValueError(f"data_range must span a positive width, got {data_range!r}; e.g. 1.0 for [0, 1] images.")
    return low, high


def clamp_full_precision(images: Tensor) -> Tensor:
    """Clamp to [-1, 1] in at least float32 (bf16 reconstructions are upcast)."""
    return images.to(torch.promote_types(images.dtype, torch.float32)).clamp(-1, 1)


def to_unit_range(images: Tensor, data_range: DataRange = SIGNED) -> Tensor:
    """Images spanning `data_range` ([-1, 1] by default) -> [0, 1], clamped, at least float32. For [-1, 1] this is
    bit for bit the (x + 1) / 2 of earlier releases: x - (-1) and a division by 2 are exact steps."""
    low, high = span(data_range)
    return (images.to(torch.promote_types(images.dtype, torch.float32)).clamp(low, high) - low) / (high - low)


def truncate_to_uint8_levels(images01: Tensor) -> Tensor:
    """The authors' uint8 conversion: x255 then cast (truncation, not rounding), back to [0, 1]."""
    return (images01 * 255).to(torch.uint8).double() / 255


# Not torchmetrics' peak_signal_noise_ratio: it scales by 10 / ln(10) computed in float32, ~2e-6 dB off at 40 dB
# even on float64 images, and these PSNRs are compared with the paper's and analytic values in float64.
def psnr_per_image(a01: Tensor, b01: Tensor) -> Tensor:
    """[B, C, H, W] x2 -> [B] PSNR in dB with data range 1 (inf for identical images)."""
    mse = (a01.double() - b01.double()).pow(2).flatten(1).mean(dim=1)
    return -10 * torch.log10(mse)


def psnr_pooled(a01: Tensor, b01: Tensor) -> Tensor:
    """One PSNR from the MSE over the whole batch (the paper's quirk, method §7)."""
    mse = (a01.double() - b01.double()).pow(2).mean()
    return -10 * torch.log10(mse)


def ssim_gaussian_per_image(a01: Tensor, b01: Tensor) -> Tensor:
    """[B] standard SSIM (Wang et al. 2004): Gaussian window sigma 1.5 (11 taps), population covariance.

    Equals scikit-image's ``structural_similarity(..., gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1, channel_axis=-1)``.
    """
    taps = torch.arange(-GAUSSIAN_RADIUS, GAUSSIAN_RADIUS + 1, dtype=torch.float64)
    window = torch.exp(-(taps**2) / (2 * GAUSSIAN_SIGMA**2))
    return _ssim_valid_region(a01, b01, window / window.sum(), sample_covariance=False)


def ssim_skimage_per_image(a01: Tensor, b01: Tensor) -> Tensor:
    """[B] SSIM with scikit-image's defaults: 7x7 uniform window, sample covariance (the authors' SSIM)."""
    window = torch.full((SKIMAGE_WINDOW,), 1 / SKIMAGE_WINDOW, dtype=torch.float64)
    return _ssim_valid_region(a01, b01, window, sample_covariance=True)


def _ssim_valid_region(a01: Tensor, b01: Tensor, window_1d: Tensor, sample_covariance: bool) -> Tensor:
    """Mean SSIM map over the positions whose window lies inside the image, per image: [B].

    scikit-image filters the whole image, then averages the SSIM map over the region at least
    (window - 1) / 2 pixels from the border; those are exactly the outputs of an unpadded convolution.
    The per-channel means have equal weight, so one mean over channels and positions is the same.
    """
    a, b = a01.double(), b01.double()
    mean = lambda t: _separable_filter(t, window_1d.to(t.device))  # noqa: E731 (local weighted mean)
    mu_a, mu_b = mean(a), mean(b)
    taps = window_1d.numel() ** 2
    correction = taps / (taps - 1) if sample_covariance else 1.0
    var_a = correction * (mean(a * a) - mu_a**2)
    var_b = correction * (mean(b * b) - mu_b**2)
    cov_ab = correction * (mean(a * b) - mu_a * mu_b)
    c1, c2 = SSIM_K1**2, SSIM_K2**2  # data range 1
    numerator = (2 * mu_a * mu_b + c1) * (2 * cov_ab + c2)
    denominator = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return (numerator / denominator).flatten(1).mean(dim=1)


def _separable_filter(images: Tensor, window_1d: Tensor) -> Tensor:
    """Valid (unpadded) per-channel filtering with the outer product of ``window_1d`` with itself."""
    channels, taps = images.shape[1], window_1d.numel()
    rows = F.conv2d(images, window_1d.view(1, 1, 1, taps).expand(channels, 1, 1, taps), groups=channels)
    return F.conv2d(rows, window_1d.view(1, 1, taps, 1).expand(channels, 1, taps, 1), groups=channels)


# ----------------------------------------------------------------------------------------------------------
# Metrics


class _MeanOfScores(MeanMetric):
    """torchmetrics' MeanMetric of the scores ``score`` returns for image pairs, in float64, on all processes."""

    full_state_update = False
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(nan_strategy="disable", **kwargs)  # a NaN score must show in the mean, not vanish
        self.set_dtype(torch.float64)

    @property
    def score_count(self) -> Tensor:
        """How many scores the mean holds."""
        return self.weight

    def score(self, preds: Tensor, target: Tensor) -> Tensor:
        """Scores of a batch of image pairs: [B] (per image) or [] (per batch)."""
        raise NotImplementedError

    def update(self, preds: Tensor, target: Tensor) -> None:
        """preds: the reconstructions, target: the originals (torchmetrics' order)."""
        check_image_pair(preds, target)
        # Scores in full precision even when the evaluation loop runs under bf16 autocast.
        with torch.no_grad(), torch.autocast(preds.device.type, enabled=False):
            scores = self.score(preds, target).double()
        super().update(scores)


class _PixelScores(_MeanOfScores):
    """A score on pixel values in [0, 1], from images spanning ``data_range`` (see the module docstring)."""

    def __init__(self, data_range: DataRange = SIGNED, **kwargs) -> None:
        super().__init__(**kwargs)
        self.data_range = span(data_range)

    def unit(self, images: Tensor) -> Tensor:
        return to_unit_range(images, self.data_range)


class PSNR(_PixelScores):
    """Per-image PSNR (dB) on float images spanning ``data_range``, averaged over images."""

    higher_is_better = True

    def score(self, preds: Tensor, target: Tensor) -> Tensor:
        return psnr_per_image(self.unit(preds), self.unit(target))


class PaperPSNR(_PixelScores):
    """The authors' PSNR: uint8-truncated images, MSE pooled over each update batch, mean over batches.

    Feed batches of 5 images to reproduce the paper's numbers (method §7).
    """

    higher_is_better = True

    def score(self, preds: Tensor, target: Tensor) -> Tensor:
        a, b = (truncate_to_uint8_levels(self.unit(t)) for t in (preds, target))
        return psnr_pooled(a, b)


class SSIM(_PixelScores):
    """Per-image SSIM of Wang et al. (Gaussian window) on images spanning ``data_range``, averaged over images."""

    higher_is_better = True

    def score(self, preds: Tensor, target: Tensor) -> Tensor:
        return ssim_gaussian_per_image(self.unit(target), self.unit(preds))


class PaperSSIM(_PixelScores):
    """The authors' SSIM: scikit-image defaults on uint8-truncated images, per image, averaged."""

    higher_is_better = True

    def score(self, preds: Tensor, target: Tensor) -> Tensor:
        a, b = (truncate_to_uint8_levels(self.unit(t)) for t in (target, preds))
        return ssim_skimage_per_image(a, b)


class LPIPSMetric(_MeanOfScores):
    """LPIPS v0.1 (``net`` = "alex" or "vgg") on [-1, 1] images, averaged per image.

    ``weights``: None = pretrained (cached, else downloaded), "random" = explicit stand-in, or a path;
    or pass a ready ``distance`` (an ``LPIPSDistance``) to share one network between metrics and losses.
    """

    higher_is_better = False

    def __init__(
        self,
        net: str = "alex",
        weights: str | os.PathLike | None = None,
        distance: LPIPSDistance | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.distance = distance if distance is not None else LPIPSDistance(net, weights)

    @property
    def is_stand_in(self) -> bool:
        return self.distance.is_stand_in

    def score(self, preds: Tensor, target: Tensor) -> Tensor:
        return self.distance(clamp_full_precision(target), clamp_full_precision(preds))
