"""Replicate statistics and the zero-cost reference codecs of the ablation table, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from flowmo.ablate.stats import mean_interval, paired_difference
from flowmo.references import (
    equal_bit_bits,
    equal_bit_thumbnail,
    mean_colour,
    pool_bits_per_pixel,
    pool_reference,
    quantise,
)


def test_the_student_t_interval_of_three_values():
    # mean 2, sample sd 1, se 1/sqrt(3); t(0.975, 2 df) = 4.302653
    estimate = mean_interval([1.0, 2.0, 3.0])
    assert estimate.mean == pytest.approx(2.0) and estimate.n == 3
    assert estimate.half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert estimate.format() == "2.00 ± 2.48"


def test_one_value_has_no_interval_and_a_missing_replicate_is_counted_not_averaged():
    assert mean_interval([5.0]).half_width is None and mean_interval([5.0]).format() == "5.00"
    estimate = mean_interval([1.0, None, 3.0, float("nan")])
    assert estimate.mean == pytest.approx(2.0) and estimate.n == 2 and estimate.missing == 2
    assert estimate.format() == "2.00 ± 12.71 (2 of 4)"  # sd sqrt(2), se 1, t(0.975, 1 df) = 12.706205
    assert mean_interval([None]).format() == "missing"


def test_the_paired_difference_is_taken_seed_by_seed():
    # differences 0.5, 1, 2: mean 7/6, sd sqrt(7/12), t(0.975, 2) = 4.302653
    cell, base = {0: 1.0, 1: 2.0, 2: 4.0}, {0: 0.5, 1: 1.0, 2: 2.0}
    estimate = paired_difference(cell, base)
    assert estimate.mean == pytest.approx(7 / 6)
    assert estimate.half_width == pytest.approx(4.302653 * math.sqrt(7 / 12) / math.sqrt(3), rel=1e-6)
    assert not estimate.excludes_zero  # 1.17 ± 1.90 spans 0
    shifted = paired_difference({s: v + 10 for s, v in cell.items()}, cell)
    assert shifted.half_width == pytest.approx(0.0, abs=1e-9) and shifted.mean == pytest.approx(10)
    assert paired_difference({0: 1.0, 1: None}, {0: 0.0, 1: 0.0}).missing == 1


def test_the_equal_bit_thumbnail_at_a_known_rate():
    # the demo tokenizer: 16 tokens x 72 bits on 32 px = 1.125 bits per pixel -> an 8x8 pool at 6 bits a value
    assert equal_bit_bits(1.125, 32) == 6 and pool_bits_per_pixel(32, 8, 6) == 1.125
    assert pool_bits_per_pixel(32) == 1.5  # the 8-bit pool: 1536 bits
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    thumbnail, rate = equal_bit_thumbnail(images, 1.125)
    assert rate == 1.125 and thumbnail.shape == images.shape
    pooled = pool_reference(images)
    assert (thumbnail - pooled).abs().max() <= 1 / 64 + 1e-6  # half a step of 64 levels over [-1, 1]
    assert len(torch.unique(thumbnail)) <= 64
    with pytest.raises(ValueError, match="smaller grid"):
        equal_bit_bits(0.01, 32)


def test_quantise_and_mean_colour():
    assert torch.equal(quantise(torch.tensor([-1.0, -0.1, 0.1, 1.0]), 1), torch.tensor([-0.5, -0.5, 0.5, 0.5]))
    images = torch.rand(2, 3, 8, 8)
    assert torch.allclose(mean_colour(images)[:, :, 3, 5], images.mean(dim=(2, 3)))


def test_reference_scores_accumulate_batches_like_the_metrics_and_skip_what_a_rate_cannot_pay():
    from flowmo.metrics.image import psnr_per_image, to_unit_range
    from flowmo.references import ReferenceScores

    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    scores = ReferenceScores(bits_per_pixel=1.125, image_size=32)
    scores.update(images[:4])
    scores.update(images[4:])
    result = scores.compute()
    assert set(result) == {"mean_colour", "pool8", "equal_bit"}
    expected = psnr_per_image(to_unit_range(images), to_unit_range(mean_colour(images))).mean()
    assert result["mean_colour"]["psnr"] == pytest.approx(float(expected), rel=1e-6)
    assert (
        result["mean_colour"]["bits_per_pixel"],
        result["pool8"]["bits_per_pixel"],
        result["equal_bit"]["bits_per_pixel"],
    ) == (24 / 1024, 1.5, 1.125)
    assert "6 bits per value" in result["equal_bit"]["label"]
    assert result["pool8"]["psnr"] >= result["equal_bit"]["psnr"] > result["mean_colour"]["psnr"]
    continuous = ReferenceScores(bits_per_pixel=float("inf"), image_size=32)
    continuous.update(images)
    assert set(continuous.compute()) == {"mean_colour", "pool8"}  # no rate to match
    assert ReferenceScores(1.125, 32).compute() == {}  # nothing seen, nothing reported
