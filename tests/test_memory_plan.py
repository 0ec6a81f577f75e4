"""The memory planner (issue 21) and activation checkpointing: predictions counted on fake tensors agree with what
a real step allocates on this CPU, CUDA autocast's dtype rules are modelled, and recomputing blocks changes memory,
not results."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from flowmo.bench.memory import CudaAutocastPolicy, measured_step_peak, plan
from flowmo.errors import UserError
from flowmo.nn.tokenizer import FlowMoTokenizer
from flowmo.presets import resolve_config
from module_fields import module_with

warnings.filterwarnings("ignore")


@pytest.mark.parametrize(
    "preset, stage, precision, checkpointing",
    [
        ("tiny", "1a", "32-true", "none"),
        ("tiny", "1a", "bf16-mixed", "none"),
        ("tiny", "1a", "32-true", "blocks"),
        pytest.param("tiny", "1b", "32-true", "none", marks=pytest.mark.slow),  # the 1B chain + ResNet-50: ~30 s
        pytest.param("cpu-mid", "1a", "32-true", "none", marks=pytest.mark.slow),
    ],
)
def test_the_plan_matches_the_allocator_s_measured_peak_within_15_percent(preset, stage, precision, checkpointing):
    """`autocast="cpu"`: the prediction for this CPU's own autocast, so the measurement can check the counting."""
    predicted = plan(preset, stage, 8, precision, checkpointing, ranks=1, autocast="cpu").step_peak_gib
    measured = measured_step_peak(preset, stage, 8, precision, checkpointing)
    assert abs(predicted - measured) <= 0.15 * measured, (predicted, measured)


def test_cuda_autocast_rules_are_modelled():
    x = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16), CudaAutocastPolicy():
        y = torch.nn.Linear(8, 8)(x)  # lower precision on both devices
        normed = F.layer_norm(y, (8,))  # fp32 on CUDA, left in bf16 by CPU autocast
        promoted = torch.addcmul(y, y, x)  # the widest input dtype on CUDA
    assert y.dtype == torch.bfloat16 and normed.dtype == torch.float32 and promoted.dtype == torch.float32
    with CudaAutocastPolicy():
        assert F.layer_norm(x.bfloat16(), (8,)).dtype == torch.bfloat16  # outside autocast: nothing changes


@pytest.mark.slow
def test_the_plan_counts_what_the_paper_keeps_outside_a_step():
    tiny = plan("tiny", "1a", 2, "bf16-mixed", ranks=8, gradient_as_bucket_view=False)
    parameters = tiny.parameters * 4 / 2**30
    assert tiny.adam_gib == pytest.approx(2 * parameters) and tiny.ema_gib == pytest.approx(parameters)
    assert tiny.ddp_buckets_gib == pytest.approx(parameters)  # the second copy that bucket views avoid
    assert plan("tiny", "1a", 2, "bf16-mixed", ranks=8).ddp_buckets_gib == 0
    frozen_encoder = plan("tiny", "1b", 2, "bf16-mixed", ranks=1)
    assert frozen_encoder.adam_gib < tiny.adam_gib  # 1B trains the decoder alone


def test_recomputing_blocks_lowers_the_plan():
    without = plan("tiny", "1a", 8, "bf16-mixed", "none", ranks=1)
    every_2 = plan("tiny", "1a", 8, "bf16-mixed", "every_2", ranks=1)
    blocks = plan("tiny", "1a", 8, "bf16-mixed", "blocks", ranks=1)
    assert blocks.activations_gib < every_2.activations_gib < without.activations_gib


@pytest.mark.parametrize("setting", ["blocks", "every_2"])
def test_activation_checkpointing_changes_no_value_or_gradient(setting):
    torch.manual_seed(0)
    tokenizer = FlowMoTokenizer(resolve_config("tiny"))
    images = torch.rand(2, 3, 32, 32) * 2 - 1

    def step(checkpointing: str):
        tokenizer.set_activation_checkpointing(checkpointing).zero_grad()
        codes = tokenizer.quantize(tokenizer.encode(images)).codes
        velocity = tokenizer.velocity(images, codes, torch.full((2,), 0.3))
        velocity.pow(2).mean().backward()
        return velocity.detach(), [p.grad.clone() for p in tokenizer.parameters() if p.grad is not None]

    (v0, g0), (v1, g1) = step("none"), step(setting)
    assert torch.equal(v0, v1) and len(g0) == len(g1) and all(torch.equal(a, b) for a, b in zip(g0, g1))


def test_an_unknown_checkpointing_setting_is_refused_in_one_sentence():
    with pytest.raises(UserError, match="activation_checkpointing must be none, blocks or every_K"):
        module_with(preset="tiny", perceptual="none", activation_checkpointing="sometimes")
