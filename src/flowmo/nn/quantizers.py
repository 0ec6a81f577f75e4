"""Quantizers that turn the encoder's continuous code into the tokens (method §2).

- `LFQ`: sign bits with a straight-through estimator, MAGVIT-2 entropy loss over G-bit sub-tokens,
  commitment loss. FlowMo's quantizer.
- `FSQ`: finite scalar quantization with per-channel levels (the paper's Table 4 ablation).
- `ContinuousCode`: no quantization (continuous-latent comparison).

All take and return codes shaped [B, L, D] (L latent tokens, D channels per token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn


@dataclass
class QuantizerOutput:
    """codes: [B, L, D] quantized (straight-through gradient to the continuous code).
    indices: [B, L*F] int64 sub-token ids (LFQ), [B, L] (FSQ), None (continuous).
    Loss terms are scalars, None when `with_losses=False` (inference)."""

    codes: Tensor
    indices: Tensor | None
    loss: Tensor | None = None
    entropy_loss: Tensor | None = None
    commitment_loss: Tensor | None = None
    per_sample_entropy: Tensor | None = None
    codebook_entropy: Tensor | None = None


def _entropy(probs: Tensor, eps: float = 1e-5) -> Tensor:
    """H(p) = -sum p log(p + eps) over the last dim (the authors' codebook entropy, method §2)."""
    return -(probs * torch.log(probs + eps)).sum(dim=-1)


class LFQ(nn.Module):
    """Lookup-free quantization: q(c) = +1 if c > 0 else -1, per channel (no tanh, method §8.10).

    Entropy grouping: with F = D/G, channel f of token l belongs to sub-token l*F + (f mod F) as bit
    f div F, so a Lo token (D=18, G=9) splits into its even and odd channels. Sub-token index =
    sum_j bit_j 2^j (little-endian: channel bit 0 is the least significant).
    """

    def __init__(self, code_dim: int, group_bits: int, temperature: float = 0.1,
                 entropy_weight: float = 0.0025, commit_weight: float = 0.000625):
        super().__init__()
        if code_dim % group_bits:
            raise ValueError(f"code_dim {code_dim} is not divisible by the entropy group size {group_bits}.")
        self.code_dim, self.group_bits = code_dim, group_bits
        self.groups_per_token = code_dim // group_bits
        self.temperature = temperature
        self.entropy_weight, self.commit_weight = entropy_weight, commit_weight
        self.register_buffer("bit_values", 2 ** torch.arange(group_bits), persistent=False)

    @property
    def codebook_size(self) -> int:
        return 2**self.group_bits

    def to_subtokens(self, code: Tensor) -> Tensor:
        """[B, L, D] -> [B, L*F, G]; channel f = j*F + r goes to sub-token l*F + r as bit j."""
        return rearrange(code, "b l (j r) -> b (l r) j", r=self.groups_per_token)

    def from_subtokens(self, subtokens: Tensor) -> Tensor:
        """[B, L*F, G] -> [B, L, D]; inverse of `to_subtokens`."""
        return rearrange(subtokens, "b (l r) j -> b l (j r)", r=self.groups_per_token)

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        bits = (self.to_subtokens(codes) > 0).long()
        return (bits * self.bit_values).sum(dim=-1)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """int64 [B, L*F] -> codes in {-1, +1} [B, L, D] (float32)."""
        bits = (indices[..., None] // self.bit_values) % 2  # [B, L*F, G]
        return self.from_subtokens(bits.float() * 2 - 1)

    def forward(self, code: Tensor, with_losses: bool = True) -> QuantizerOutput:
        quantized = torch.where(code > 0, 1.0, -1.0).to(code.dtype)
        codes = code + (quantized - code).detach()
        out = QuantizerOutput(codes=codes, indices=self.codes_to_indices(quantized))
        if with_losses:
            self._add_losses(out, code, quantized)
        return out

    def _add_losses(self, out: QuantizerOutput, code: Tensor, quantized: Tensor) -> None:
        with torch.autocast(code.device.type, enabled=False):
            per_sample, codebook = self.entropy_terms(code.float())
            commitment = (code.float() - quantized.float()).pow(2).mean()
        out.per_sample_entropy, out.codebook_entropy = per_sample, codebook
        out.entropy_loss = per_sample - codebook
        out.commitment_loss = commitment
        out.loss = self.entropy_weight * out.entropy_loss + self.commit_weight * commitment

    def entropy_terms(self, code: Tensor) -> tuple[Tensor, Tensor]:
        """(mean per-sub-token entropy, entropy of the mean distribution), over this micro-batch.

        logits_k = 2 <c_sub, e_k> for every codeword e_k in {-1,+1}^G, softmax at temperature 0.1.
        """
        subtokens = self.to_subtokens(code).reshape(-1, self.group_bits)  # [N, G]
        codebook = self.indices_to_codes_flat(torch.arange(self.codebook_size, device=code.device))  # [2^G, G]
        logits = (2 * subtokens @ codebook.T) / self.temperature  # [N, 2^G]
        log_probs = torch.log_softmax(logits, dim=-1)
        probs = log_probs.exp()
        # Per-sub-token entropy from the exact log-softmax; the batch-mean distribution with log(p + 1e-5):
        # the two differ by ~1e-4 and the reference implementation uses exactly this pair.
        per_sample = -(probs * log_probs).sum(dim=-1).mean()
        return per_sample, _entropy(probs.mean(dim=0))

    def indices_to_codes_flat(self, indices: Tensor) -> Tensor:
        """int64 [N] -> [N, G] in {-1, +1}: the codeword of each sub-token index."""
        return ((indices[:, None] // self.bit_values) % 2).float() * 2 - 1


class FSQ(nn.Module):
    """Finite scalar quantization (Mentzer et al. 2023): bound each channel with tanh to its level
    count, round with a straight-through estimator, rescale to [-1, 1]. One index per token."""

    def __init__(self, levels: tuple[int, ...]):
        super().__init__()
        self.levels = tuple(levels)
        self.code_dim = len(levels)
        self.register_buffer("level_counts", torch.tensor(levels, dtype=torch.float32), persistent=False)
        basis = torch.cumprod(torch.tensor((1,) + tuple(levels[:-1]), dtype=torch.int64), dim=0)
        self.register_buffer("basis", basis, persistent=False)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    @property
    def has_ids(self) -> bool:
        """Whether a token's code fits one int64 id (prod(levels) < 2^63)."""
        return self.codebook_size < 2**63

    def _bound(self, code: Tensor) -> Tensor:
        """Squash to (-(L-1)/2, (L-1)/2), shifted by half a step for even L so rounding gives L values."""
        half = (self.level_counts - 1) * (1 + 1e-3) / 2
        offset = torch.where(self.level_counts % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half)
        return torch.tanh(code + shift) * half - offset

    def forward(self, code: Tensor, with_losses: bool = True) -> QuantizerOutput:
        bounded = self._bound(code.float())
        rounded = bounded + (bounded.round() - bounded).detach()
        half_width = torch.div(self.level_counts, 2, rounding_mode="floor")
        codes = (rounded / half_width).to(code.dtype)
        # one int64 id per token only while the codebook fits (8^24 levels = 72 bits does not): otherwise no ids
        indices = self.codes_to_indices(codes) if self.has_ids else None
        out = QuantizerOutput(codes=codes, indices=indices)
        if with_losses:
            zero = code.new_zeros((), dtype=torch.float32)
            out.loss = out.entropy_loss = out.commitment_loss = zero
        return out

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        half_width = torch.div(self.level_counts, 2, rounding_mode="floor")
        digits = (codes.float() * half_width + half_width).round().long()  # [B, L, D] in [0, L_d)
        return (digits * self.basis).sum(dim=-1)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        if not self.has_ids:
            raise ValueError(f"FSQ levels {self.levels} make {self.codebook_size:.3g} codes per token, more than an "
                             "int64 id holds; this tokenizer has no token ids (use encode/quantize codes).")
        half_width = torch.div(self.level_counts, 2, rounding_mode="floor")
        digits = (indices[..., None] // self.basis) % self.level_counts.long()
        return (digits.float() - half_width) / half_width


class ContinuousCode(nn.Module):
    """No quantization: the decoder reads the encoder's continuous code (ablation / continuous variant)."""

    def __init__(self, code_dim: int):
        super().__init__()
        self.code_dim = code_dim

    def forward(self, code: Tensor, with_losses: bool = True) -> QuantizerOutput:
        out = QuantizerOutput(codes=code, indices=None)
        if with_losses:
            zero = code.new_zeros((), dtype=torch.float32)
            out.loss = out.entropy_loss = out.commitment_loss = zero
        return out

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        raise ValueError("a continuous-code FlowMo has no token indices; use a config with quantizer 'lfq' or 'fsq'.")


def build_quantizer(config) -> nn.Module:
    """The quantizer named by `config.quantizer` (a FlowMoConfig)."""
    if config.quantizer == "lfq":
        return LFQ(config.code_dim, config.entropy_group_bits, config.entropy_temperature,
                   config.entropy_loss_weight, config.commit_loss_weight)
    if config.quantizer == "fsq":
        return FSQ(config.fsq_levels)
    return ContinuousCode(config.code_dim)
