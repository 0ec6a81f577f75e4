"""Codebook usage on crafted index sets, and the bits-per-pixel helper."""

import math

import pytest
import torch

from flowmo.metrics import CodebookUsage, bits_per_pixel, index_bits


def usage_of(bits, *batches):
    metric = CodebookUsage(bits)
    for batch in batches:
        metric.update(torch.tensor(batch, dtype=torch.long))
    return {k: v.tolist() if v.dim() else float(v) for k, v in metric.compute().items()}


def test_half_the_codes_used_uniformly():
    usage = usage_of(3, [[0, 1, 2, 3], [0, 1, 2, 3]])  # 4 of 8 codes, equally often
    assert usage["used_fraction"] == 0.5
    assert usage["entropy_bits"] == pytest.approx(2.0)
    assert usage["perplexity"] == pytest.approx(4.0)
    # bit 0 is set in 1 and 3, bit 1 in 2 and 3, bit 2 never (little-endian, method §2)
    assert usage["bit_balance"] == pytest.approx([0.5, 0.5, 0.0])


def test_skewed_histogram_accumulates_over_updates():
    usage = usage_of(2, [[3, 3]], [[0, 1]])  # counts {3: 2, 0: 1, 1: 1}
    assert usage["used_fraction"] == 0.75
    assert usage["entropy_bits"] == pytest.approx(1.5)
    assert usage["bit_balance"] == pytest.approx([3 / 4, 2 / 4])


def test_every_code_once_has_full_entropy():
    usage = usage_of(4, [list(range(16))])
    assert usage["used_fraction"] == 1.0
    assert usage["entropy_bits"] == pytest.approx(4.0)
    assert usage["bit_balance"] == pytest.approx([0.5] * 4)


def test_index_bits_little_endian():
    assert index_bits(torch.tensor([6]), 3).tolist() == [[0, 1, 1]]


@pytest.mark.parametrize("bad", [torch.tensor([[8]]), torch.tensor([[-1]]), torch.zeros(2, 2), torch.tensor([1, 2])])
def test_bad_indices_are_rejected(bad):
    with pytest.raises(ValueError):
        CodebookUsage(3).update(bad)


def test_state_is_not_checkpointed():
    metric = CodebookUsage(9)
    metric.update(torch.randint(0, 512, (2, 512)))
    assert metric.state_dict() == {}


def test_bits_per_pixel_of_the_paper_configurations():
    assert bits_per_pixel(256, 18, 256, 256) == pytest.approx(0.0703, abs=1e-4)  # FlowMo-Lo
    assert bits_per_pixel(256, 56, 256, 256) == pytest.approx(0.219, abs=1e-3)  # FlowMo-Hi
    assert math.isclose(bits_per_pixel(16, 8, 32, 32), 0.125)
