"""MaskGIT on FlowMo tokens: mask schedule and decoding invariants, and a tiny generator that memorises."""

import math

import pytest
import torch

from flowmo.errors import UserError
from flowmo.generate import MaskGITModule, masked_counts, training_mask
from flowmo.generate.masking import decode, masked_token_loss

LAYOUT = dict(tokens=8, groups=2, codebook_size=16, num_classes=4)


@pytest.mark.parametrize("tokens, steps", [(8, 1), (8, 3), (8, 8), (16, 8), (256, 8), (256, 12)])
def test_masked_counts_unmask_at_least_one_token_per_step_and_end_at_zero(tokens, steps):
    counts = masked_counts(tokens, steps)
    previous = [tokens] + counts[:-1]
    assert len(counts) == steps and counts[-1] == 0
    assert all(after < before for before, after in zip(previous, counts))  # strictly fewer masked each step
    assert all(count >= steps - step - 1 for step, count in enumerate(counts))  # later steps still have work


def test_masked_counts_follow_the_cosine_schedule_when_no_clamp_applies():
    counts = masked_counts(256, 8)
    expected = [math.floor(256 * math.cos(math.pi / 2 * (s + 1) / 8)) for s in range(8)]
    assert counts == expected


def test_masked_counts_refuse_more_steps_than_tokens():
    with pytest.raises(ValueError, match="steps"):
        masked_counts(4, 5)


def test_training_mask_masks_whole_tokens_at_cosine_ratios():
    generator = torch.Generator().manual_seed(0)
    mask = training_mask(4000, 16, torch.device("cpu"), generator)
    counts = mask.sum(1)
    assert counts.min() >= 1 and counts.max() <= 16
    # the count is ceil(16 cos(pi/2 U)): its mean over a fine grid of U (about 16 * 2/pi + 1/2)
    grid = (torch.arange(100_000, dtype=torch.float64) + 0.5) / 100_000
    expected = torch.ceil(16 * torch.cos(math.pi / 2 * grid)).clamp(min=1).mean()
    assert counts.double().mean() == pytest.approx(float(expected), abs=0.1)


def test_loss_counts_only_masked_tokens():
    logits = torch.zeros(1, 2, 2, 4)
    logits[0, 0, :, 1] = 10.0  # token 0 predicted right, token 1 wrong
    ids = torch.tensor([[1, 1, 3, 3]])
    only_first = masked_token_loss(logits, ids, torch.tensor([[True, False]]))
    only_second = masked_token_loss(logits, ids, torch.tensor([[False, True]]))
    assert only_first < 1e-3 < only_second


def recording_decode(module, classes, steps, **settings):
    history = []
    ids = decode(
        module.network,
        classes,
        module.layout.tokens,
        module.layout.groups,
        module.network.null_class,
        steps=steps,
        on_step=lambda step, masked: history.append(masked.clone()),
        **settings,
    )
    return ids, history


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_decoding_unmasks_the_scheduled_counts_monotonically_and_keeps_decided_tokens(cfg):
    torch.manual_seed(0)
    module = MaskGITModule(token_layout=LAYOUT).eval()
    classes = torch.tensor([0, 1, 2, 3, 0])
    ids, history = recording_decode(module, classes, steps=4, cfg=cfg, generator=torch.Generator().manual_seed(1))
    assert [int(m.sum(1).unique().item()) for m in history] == masked_counts(8, 4)
    for before, after in zip(history, history[1:]):
        assert not (after & ~before).any()  # a decided token is never masked again
    assert not history[-1].any()
    assert ids.shape == (5, 16) and ids.min() >= 0 and ids.max() < 16


def test_temperature_zero_decoding_is_deterministic():
    torch.manual_seed(0)
    module = MaskGITModule(token_layout=LAYOUT).eval()
    classes = torch.tensor([0, 1, 2, 3])
    settings = dict(temperature=0.0, choice_temperature=0.0, cfg=1.5)
    first = module.generate(classes, generator=torch.Generator().manual_seed(1), **settings)
    second = module.generate(classes, generator=torch.Generator().manual_seed(2), **settings)
    assert torch.equal(first, second)


def test_generate_refuses_unknown_classes():
    module = MaskGITModule(token_layout=LAYOUT)
    with pytest.raises(UserError, match="classes"):
        module.generate(torch.tensor([4]))


def test_tiny_generator_memorises_class_conditional_sequences():
    """Class c -> sequence c: after a few hundred CPU steps, temperature-0 decoding regenerates each exactly."""
    torch.manual_seed(0)
    layout = dict(tokens=16, groups=2, codebook_size=512, num_classes=4)  # the tiny tokenizer's layout
    module = MaskGITModule(token_layout=layout, class_dropout=0.0)
    sequences = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(3))
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    classes = torch.arange(4).repeat(4)
    for _ in range(250):  # exact from about step 150 (measured); 250 leaves a margin
        loss = module.loss(sequences[classes], classes, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    module.eval()
    regenerated = module.generate(torch.arange(4), steps=4, temperature=0.0, choice_temperature=0.0, cfg=1.0)
    assert torch.equal(regenerated, sequences), f"final loss {loss.item():.4f}"
