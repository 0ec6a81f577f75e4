"""PSNR / SSIM / LPIPS metrics: analytic values and scikit-image's reference implementation."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from flowmo.metrics import PSNR, SSIM, LPIPSMetric, PaperPSNR, PaperSSIM, ReconstructionMetrics


def natural_ish(batch, size=48, seed=0):
    """Smooth random images plus fine noise, in [-1, 1]: structure at several scales, like photos."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, size // 8, size // 8, generator=generator)
    smooth = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    fine = 0.1 * torch.randn(batch, 3, size, size, generator=generator)
    return (smooth + fine).clamp(0, 1) * 2 - 1


def degrade(images, seed=1, noise=0.15):
    generator = torch.Generator().manual_seed(seed)
    return (images + noise * torch.randn(images.shape, generator=generator)).clamp(-1, 1)


def uint8_truncated_hwc(images):
    """The authors' conversion done in numpy: [-1, 1] -> [0, 1] -> x255 -> astype(uint8) -> /255."""
    unit = ((images.clamp(-1, 1) + 1) / 2).float().permute(0, 2, 3, 1).numpy()
    return (unit * 255).astype(np.uint8).astype(np.float64) / 255


def unit_hwc(images):
    return ((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).double().numpy()


def run(metric, pairs):
    for original, reconstruction in pairs:
        metric.update(reconstruction, original)  # torchmetrics' order: preds, target
    return float(metric.compute())


@pytest.fixture(scope="module")
def batches():
    """Two evaluation batches of 5 (the paper's batch size)."""
    originals = [natural_ish(5, seed=s) for s in (0, 1)]
    return [(o, degrade(o, seed=10 + i)) for i, o in enumerate(originals)]


def test_identical_images():
    x = natural_ish(3)
    assert math.isinf(run(PSNR(), [(x, x)]))
    assert run(SSIM(), [(x, x)]) == pytest.approx(1.0, abs=1e-6)
    assert run(PaperSSIM(), [(x, x)]) == pytest.approx(1.0, abs=1e-12)


def test_constant_offset_gives_analytic_psnr():
    delta = 0.05  # in [0, 1] units
    x = torch.rand(4, 3, 16, 16, dtype=torch.float64) - 0.5  # [-0.5, 0.5], stays inside after the offset
    assert run(PSNR(), [(x, x + 2 * delta)]) == pytest.approx(-20 * math.log10(delta), abs=1e-5)


def test_paper_psnr_on_uint8_levels_is_analytic():
    # Values at level + 0.5 truncate to exactly `level`, so a 3-level offset survives the uint8 cast.
    levels = torch.randint(0, 250, (5, 3, 16, 16)).double()
    to_signed = lambda lv: ((lv + 0.5) / 255) * 2 - 1  # noqa: E731
    expected = 20 * math.log10(255 / 3)
    assert run(PaperPSNR(), [(to_signed(levels), to_signed(levels + 3))]) == pytest.approx(expected, abs=1e-6)


def test_paper_psnr_matches_skimage_on_pooled_batches(batches):
    expected = np.mean(
        [peak_signal_noise_ratio(uint8_truncated_hwc(o), uint8_truncated_hwc(r), data_range=1) for o, r in batches]
    )
    assert run(PaperPSNR(), batches) == pytest.approx(expected, abs=1e-4)


def test_paper_ssim_matches_skimage_defaults(batches):
    scores = [
        structural_similarity(a, b, data_range=1, channel_axis=-1)
        for o, r in batches
        for a, b in zip(uint8_truncated_hwc(o), uint8_truncated_hwc(r))
    ]
    assert run(PaperSSIM(), batches) == pytest.approx(np.mean(scores), abs=1e-4)


def test_psnr_is_the_per_image_mean(batches):
    scores = [peak_signal_noise_ratio(a, b, data_range=1) for o, r in batches for a, b in zip(unit_hwc(o), unit_hwc(r))]
    assert run(PSNR(), batches) == pytest.approx(np.mean(scores), abs=1e-4)


def test_ssim_is_the_gaussian_per_image_mean(batches):
    scores = [
        structural_similarity(
            a, b, data_range=1, channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
        for o, r in batches
        for a, b in zip(unit_hwc(o), unit_hwc(r))
    ]
    assert run(SSIM(), batches) == pytest.approx(np.mean(scores), abs=1e-4)


def test_lpips_metric_averages_per_image():
    with pytest.warns(UserWarning, match="RANDOM"):
        metric = LPIPSMetric("alex", weights="random")
    x, y = natural_ish(4, size=32), degrade(natural_ish(4, size=32), seed=3)
    with torch.no_grad():
        expected = metric.distance(x, y).double().mean()
    metric.update(y[:2], x[:2])
    metric.update(y[2:], x[2:])
    assert float(metric.compute()) == pytest.approx(float(expected), abs=1e-6)
    assert metric.is_stand_in and metric.state_dict() == {}


def test_reconstruction_metrics_names_and_empty_state_dict():
    with pytest.warns(UserWarning, match="RANDOM"):
        metrics = ReconstructionMetrics(lpips_weights="random", fid_feature="random", codebook_bits=4)
    x = natural_ish(5, size=32)
    metrics.update(degrade(x), x, indices=torch.randint(0, 16, (5, 8)))
    results = metrics.compute()
    expected_names = {"psnr", "psnr_paper", "ssim", "ssim_paper", "lpips_alex", "lpips_vgg", "rfid"}
    assert expected_names <= set(results) and "codebook_used_fraction" in results
    assert all(isinstance(v, float) for v in results.values())
    assert metrics.state_dict() == {}
    assert metrics.stand_ins == ["LPIPS-alex", "LPIPS-vgg", "rFID random-conv features"]
    metrics.reset()
    assert int(metrics.per_image["psnr"].score_count) == 0


def test_reconstruction_metrics_reject_wrong_range():
    metrics = ReconstructionMetrics(lpips_nets=(), fid_feature=False)
    x = torch.rand(2, 3, 16, 16) * 255
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        metrics.update(torch.zeros_like(x), x)  # the target (originals) out of range


def test_metrics_run_in_full_precision_under_bf16_autocast():
    with pytest.warns(UserWarning, match="RANDOM"):
        metrics = ReconstructionMetrics(lpips_nets=("alex",), lpips_weights="random", fid_feature="random")
    x = natural_ish(5, size=32)
    y = degrade(x)
    metrics.update(y, x)
    reference = metrics.compute()
    metrics.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        metrics.update(y, x)
    assert metrics.compute() == pytest.approx(reference, rel=1e-9)


def test_data_range_follows_torchmetrics():
    """PSNR(data_range=1.0) on [0, 1] images 0.1 apart is 20 dB (torchmetrics' value); the default is [-1, 1]."""
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

    target = torch.rand(2, 3, 16, 16, dtype=torch.float64) * 0.9
    preds = target + 0.1
    assert run(PSNR(data_range=1.0), [(target, preds)]) == pytest.approx(20.0, abs=1e-9)
    assert run(PSNR(data_range=1.0), [(target, preds)]) == pytest.approx(
        float(PeakSignalNoiseRatio(data_range=1.0)(preds, target)), abs=1e-4
    )
    assert run(PSNR(), [(target * 2 - 1, preds * 2 - 1)]) == pytest.approx(20.0, abs=1e-9)  # [-1, 1], width 2
    assert run(PSNR(data_range=255.0), [(target * 255, preds * 255)]) == pytest.approx(20.0, abs=1e-6)
    ours = run(SSIM(data_range=1.0), [(target, preds)])
    theirs = float(StructuralSimilarityIndexMeasure(data_range=1.0, gaussian_kernel=True, sigma=1.5)(preds, target))
    assert ours == pytest.approx(theirs, abs=0.02)  # torchmetrics pads the border; ours keeps the valid region
    with pytest.raises(ValueError, match="data_range"):
        PSNR(data_range=0.0)
