"""Cheap statistics logged during training, computed without host synchronisation."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def global_norm(tensors: list[Tensor]) -> Tensor:
    """sqrt(sum ||t||^2) over a list of tensors, as one tensor (no .item())."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)).float())


def batch_codebook_stats(indices: Tensor, codebook_size: int) -> dict[str, Tensor]:
    """Usage of the 2^G sub-codes by this batch's tokens: fraction used and entropy in bits.

    A scatter into fixed-size counts (not torch.unique) keeps the shapes static: no device sync.
    """
    counts = torch.zeros(codebook_size, device=indices.device, dtype=torch.float32)
    counts.scatter_add_(0, indices.reshape(-1), torch.ones(indices.numel(), device=indices.device))
    probs = counts / counts.sum()
    entropy_bits = -(probs * torch.log2(probs.clamp_min(1e-30))).sum()
    return {
        "codebook_used_fraction": (counts > 0).float().mean(),
        "code_entropy_bits": entropy_bits,
        # a fill on the device: torch.tensor(...) would be a CPU tensor copied over at every logging step
        "code_entropy_max_bits": torch.full(
            (), min(math.log2(codebook_size), math.log2(indices.numel())), device=indices.device
        ),
    }
