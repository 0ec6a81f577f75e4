"""Codebook usage of the LFQ sub-tokens (method §2) as a DDP-correct torchmetrics Metric.

Each image has ``code_length * code_dim / G`` sub-tokens, each an index in [0, 2^G) whose bit j is the sign
of channel j (little-endian, method §2). Over the evaluated set we report:

- ``used_fraction``: fraction of the 2^G sub-codes that occur at least once;
- ``entropy_bits``: entropy (bits) of the empirical index histogram, at most G;
- ``perplexity``: 2 ** entropy_bits, the "effective number" of codes;
- ``bit_balance``: [G] fraction of ones per bit position (0.5 = balanced).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


def bits_per_pixel(code_length: int, code_dim: int, height: int, width: int) -> float:
    """Bits of the binary code per image pixel: Lo = 256*18 / 256^2 = 0.0703 (method §7.1 "BPP")."""
    return code_length * code_dim / (height * width)


def index_bits(indices: Tensor, bits: int) -> Tensor:
    """[...] int indices -> [..., bits] of 0/1, bit j = (index >> j) & 1 (little-endian, method §2)."""
    shifts = torch.arange(bits, device=indices.device)
    return (indices.unsqueeze(-1) >> shifts) & 1


class CodebookUsage(Metric):
    """Histogram of sub-token indices [B, N] (int64, values in [0, 2^bits)) summed over all processes."""

    full_state_update = False
    is_differentiable = False

    def __init__(self, bits: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 1 <= bits <= 24:
            raise ValueError(f"Codebook bits per sub-token must be in [1, 24] (2^bits counters), got {bits}.")
        self.bits = bits
        self.codebook_size = 2**bits
        self.add_state("code_counts", torch.zeros(self.codebook_size, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("ones_per_bit", torch.zeros(bits, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("num_codes", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, indices: Tensor) -> None:
        self._check(indices)
        flat = indices.reshape(-1).long()
        self.code_counts += torch.bincount(flat, minlength=self.codebook_size)
        self.ones_per_bit += index_bits(flat, self.bits).sum(dim=0)
        self.num_codes += flat.numel()

    def _check(self, indices: Tensor) -> None:
        if indices.dtype.is_floating_point or indices.dtype == torch.bool or indices.dim() != 2:
            raise ValueError(f"Expected int64 sub-token indices [B, N], got {indices.dtype} {tuple(indices.shape)}.")
        # Evaluation only, so one host sync here is fine; bincount would fail less clearly.
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.codebook_size):
            raise ValueError(
                f"Sub-token indices must lie in [0, {self.codebook_size}) for {self.bits}-bit sub-tokens, got "
                f"[{int(indices.min())}, {int(indices.max())}]."
            )

    def compute(self) -> dict[str, Tensor]:
        total = self.num_codes.double()
        probabilities = self.code_counts.double() / total
        nonzero = probabilities[probabilities > 0]
        entropy_bits = -(nonzero * torch.log2(nonzero)).sum()
        return {
            "used_fraction": (self.code_counts > 0).double().mean(),
            "entropy_bits": entropy_bits,
            "perplexity": torch.exp2(entropy_bits),
            "bit_balance": self.ones_per_bit.double() / total,
        }
