"""MaskGIT's masking: the cosine schedule, training masks and loss, and iterative parallel decoding.

Pure functions over a network `logits_fn(ids [B, L*F], masked [B, L], classes [B]) -> logits [B, L, F, V]`.
Masking works on whole tokens; a token's confidence is the summed log-probability of its sampled sub-tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

LogitsFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def cosine_mask_ratio(progress: Tensor | float) -> Tensor:
    """gamma(r) = cos(pi/2 * r): the fraction of tokens masked at progress r in [0, 1] (MaskGIT section 3.3)."""
    return torch.cos(math.pi / 2 * torch.as_tensor(progress, dtype=torch.float64))


def masked_counts(tokens: int, steps: int) -> list[int]:
    """How many tokens stay masked after each of `steps` decoding steps: cos schedule, then clamped so that each
    step unmasks at least one token and only the last step unmasks the rest (ends at 0)."""
    if steps < 1 or steps > tokens:
        raise ValueError(f"steps must lie in [1, {tokens}] (one token at least per step), got {steps}.")
    counts, remaining = [], tokens
    for step in range(steps):
        target = math.floor(tokens * float(cosine_mask_ratio((step + 1) / steps)))
        remaining = 0 if step == steps - 1 else max(steps - step - 1, min(remaining - 1, target))
        counts.append(remaining)
    return counts


def training_mask(batch: int, tokens: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """[B, L] bool: per image r ~ U(0, 1), ceil(cos(pi/2 r) * L) tokens (at least 1) masked at random positions."""
    progress = torch.rand(batch, device=device, generator=generator)
    count = torch.ceil(torch.cos(math.pi / 2 * progress) * tokens).clamp(min=1)
    ranks = torch.rand(batch, tokens, device=device, generator=generator).argsort(dim=1).argsort(dim=1)
    return ranks < count[:, None]


def drop_classes(
    classes: Tensor, null_class: int, probability: float, generator: torch.Generator | None = None
) -> Tensor:
    """Replace each class by the null class with `probability`: the unconditional model CFG needs."""
    if probability <= 0:
        return classes
    dropped = torch.rand(classes.shape, device=classes.device, generator=generator) < probability
    return torch.where(dropped, torch.full_like(classes, null_class), classes)


def masked_token_loss(logits: Tensor, ids: Tensor, masked: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy over the sub-tokens of masked tokens only. logits [B, L, F, V], ids [B, L*F], masked [B, L]."""
    groups = logits.shape[2]
    targets = rearrange(ids, "b (l f) -> b l f", f=groups)
    per_sub_token = F.cross_entropy(
        rearrange(logits, "b l f v -> b v l f").float(), targets, label_smoothing=label_smoothing, reduction="none"
    )  # [B, L, F]
    weights = masked[..., None].expand_as(per_sub_token).float()
    return (per_sub_token * weights).sum() / weights.sum().clamp(min=1)


def guided_logits(
    logits_fn: LogitsFn, ids: Tensor, masked: Tensor, classes: Tensor, null_class: int, cfg: float
) -> Tensor:
    """Log-probabilities [B, L, F, V]; cfg != 1 mixes conditional and null-class predictions in log space:
    log p_uncond + cfg * (log p_cond - log p_uncond), both from one call on twice the batch."""
    if cfg == 1.0:
        return logits_fn(ids, masked, classes).float().log_softmax(-1)
    null = torch.full_like(classes, null_class)
    both = logits_fn(torch.cat([ids, ids]), torch.cat([masked, masked]), torch.cat([classes, null]))
    conditional, unconditional = both.float().log_softmax(-1).chunk(2)
    return (unconditional + cfg * (conditional - unconditional)).log_softmax(-1)


def sample_sub_tokens(log_probs: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """[B, L, F, V] -> ids [B, L, F]: argmax at temperature 0, else a draw from softmax(log_probs / temperature)."""
    if temperature <= 0:
        return log_probs.argmax(-1)
    gumbel = -torch.log(
        -torch.log(torch.rand(log_probs.shape, device=log_probs.device, generator=generator).clamp(1e-20, 1.0))
    )
    return (log_probs / temperature + gumbel).argmax(-1)


@torch.no_grad()
def decode(
    logits_fn: LogitsFn,
    classes: Tensor,
    tokens: int,
    groups: int,
    null_class: int,
    steps: int = 8,
    temperature: float = 1.0,
    choice_temperature: float = 4.5,
    cfg: float = 1.0,
    generator: torch.Generator | None = None,
    on_step: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """MaskGIT's iterative parallel decoding (section 3.2) -> ids [B, L*F].

    Every step predicts all masked tokens, keeps them, and re-masks the least confident ones so that
    `masked_counts(tokens, steps)[step]` stay masked. Confidence = log p(sampled token) + Gumbel noise scaled by
    choice_temperature * (1 - step progress): random choices early, greedy ones late (MaskGIT's annealing; 4.5 is
    its default). temperature 0 and choice_temperature 0 make decoding deterministic.
    `on_step(step, masked)` sees the mask after each step (tests check the schedule with it).
    """
    batch, device = classes.shape[0], classes.device
    ids = torch.zeros(batch, tokens * groups, dtype=torch.long, device=device)
    masked = torch.ones(batch, tokens, dtype=torch.bool, device=device)
    for step, keep_masked in enumerate(masked_counts(tokens, steps)):
        log_probs = guided_logits(logits_fn, ids, masked, classes, null_class, cfg)
        sampled = sample_sub_tokens(log_probs, temperature, generator)  # [B, L, F]
        confidence = log_probs.gather(-1, sampled[..., None]).squeeze(-1).sum(-1)  # [B, L]
        sampled_ids = rearrange(sampled, "b l f -> b (l f)")
        newly = rearrange(masked[..., None].expand(-1, -1, groups), "b l f -> b (l f)")
        ids = torch.where(newly, sampled_ids, ids)
        masked = remask_least_confident(
            confidence, masked, keep_masked, choice_temperature * (1 - (step + 1) / steps), generator
        )
        if on_step is not None:
            on_step(step, masked)
    return ids


def remask_least_confident(
    confidence: Tensor, masked: Tensor, keep_masked: int, noise_scale: float, generator: torch.Generator | None
) -> Tensor:
    """The new mask [B, L]: the `keep_masked` lowest-confidence tokens among those that were masked; tokens
    already known are never re-masked (MaskGIT keeps decided tokens)."""
    if noise_scale > 0:
        uniform = torch.rand(confidence.shape, device=confidence.device, generator=generator).clamp(1e-20, 1.0)
        confidence = confidence + noise_scale * -torch.log(-torch.log(uniform))
    confidence = confidence.masked_fill(~masked, float("inf"))
    ranks = confidence.argsort(dim=1, stable=True).argsort(dim=1)
    return ranks < keep_masked
