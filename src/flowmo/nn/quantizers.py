"""Quantizers that turn the encoder's continuous code into the tokens (method §2).

- `LFQ`: sign bits with a straight-through estimator, MAGVIT-2 entropy loss over G-bit sub-tokens,
  commitment loss. FlowMo's quantizer.
- `FSQ`: finite scalar quantization with per-channel levels (the paper's Table 4 ablation).
- `ContinuousCode`: no quantization (continuous-latent comparison).

All take and return codes shaped [B, L, D] (L latent tokens, D channels per token). Everything a caller needs to
know about a quantizer (its ids, its vocabulary, its bits) is an attribute of the `Quantizer` contract, so no
caller compares quantizer names. A new quantizer is one `Quantizer` subclass and one line in `QUANTIZERS`:

    class Binary(Quantizer):            # e.g. sign bits without entropy loss, one id per 8 channels
        ...                             # set code_dim, ids_per_token, codebook_size, bits_per_token, id_bits
    QUANTIZERS["binary"] = lambda config: Binary(config.code_dim)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from einops import rearrange
from torch import Tensor, nn


@dataclass(frozen=True)
class QuantizerLosses:
    """A quantizer's loss terms of one micro-batch, unweighted and logged one by one (LFQ: entropy, commitment,
    per_sample_entropy, codebook_entropy). Their weights belong to the training recipe (losses.LossRecipe)."""

    terms: Mapping[str, Tensor] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "terms", MappingProxyType(dict(self.terms)))


@dataclass(frozen=True)
class QuantizerOutput:
    """codes: [B, L, D] quantized (straight-through gradient to the continuous code).
    indices: [B, L*ids_per_token] int64 token ids, None without ids (continuous, or an FSQ too wide for int64).
    losses: None when `with_losses=False` (inference)."""

    codes: Tensor
    indices: Tensor | None
    losses: QuantizerLosses | None = None

    # The public API's names for the loss terms (None where the quantizer has no such term).
    @property
    def entropy_loss(self) -> Tensor | None:
        return self._term("entropy")

    @property
    def commitment_loss(self) -> Tensor | None:
        return self._term("commitment")

    @property
    def per_sample_entropy(self) -> Tensor | None:
        return self._term("per_sample_entropy")

    @property
    def codebook_entropy(self) -> Tensor | None:
        return self._term("codebook_entropy")

    def _term(self, name: str) -> Tensor | None:
        return None if self.losses is None else self.losses.terms.get(name)


class Quantizer(nn.Module):
    """The contract every quantizer keeps. Attributes (set by each subclass's constructor):

    code_dim        D, the channels of a code token it reads
    ids_per_token   token ids per code token (LFQ: F = D / G sub-tokens; FSQ: 1; continuous: 0)
    codebook_size   how many values one id takes (LFQ: 2^G); None when there are no ids
    bits_per_token  the information of one code token in bits (inf for a continuous code)
    id_bits         G when an id is a word of G independent bits (LFQ), whose use can be counted bit by bit
    """

    code_dim: int
    ids_per_token: int = 0
    codebook_size: int | None = None
    bits_per_token: float = math.inf
    id_bits: int | None = None

    @property
    def has_ids(self) -> bool:
        return self.codebook_size is not None

    def forward(self, code: Tensor, with_losses: bool = True) -> QuantizerOutput:
        raise NotImplementedError

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """int64 ids [B, L * ids_per_token] -> codes [B, L, D] as the decoder reads them."""
        raise ValueError(
            "this tokenizer's code has no token ids (a continuous code, or an FSQ whose levels do not fit "
            "one int64 id); use encode / quantize codes."
        )

    def zero_losses(self, code: Tensor) -> QuantizerLosses:
        """Losses of a quantizer with no loss of its own: zeros, logged under the same names as LFQ's main terms."""
        zero = code.new_zeros((), dtype=torch.float32)
        return QuantizerLosses({"entropy": zero, "commitment": zero})


def _entropy(probs: Tensor, eps: float = 1e-5) -> Tensor:
    """H(p) = -sum p log(p + eps) over the last dim (the authors' codebook entropy, method §2)."""
    return -(probs * torch.log(probs + eps)).sum(dim=-1)


class LFQ(Quantizer):
    """Lookup-free quantization: q(c) = +1 if c > 0 else -1, per channel (no tanh, method §8.10).

    Entropy grouping: with F = D/G, channel f of token l belongs to sub-token l*F + (f mod F) as bit
    f div F, so a Lo token (D=18, G=9) splits into its even and odd channels. Sub-token index =
    sum_j bit_j 2^j (little-endian: channel bit 0 is the least significant).
    """

    def __init__(self, code_dim: int, group_bits: int, temperature: float = 0.1):
        super().__init__()
        if code_dim % group_bits:
            raise ValueError(f"code_dim {code_dim} is not divisible by the entropy group size {group_bits}.")
        self.code_dim, self.group_bits = code_dim, group_bits
        self.ids_per_token = code_dim // group_bits
        self.codebook_size, self.id_bits, self.bits_per_token = 2**group_bits, group_bits, float(code_dim)
        self.temperature = temperature
        self.register_buffer("bit_values", 2 ** torch.arange(group_bits), persistent=False)

    def to_subtokens(self, code: Tensor) -> Tensor:
        """[B, L, D] -> [B, L*F, G]; channel f = j*F + r goes to sub-token l*F + r as bit j."""
        return rearrange(code, "b l (j r) -> b (l r) j", r=self.ids_per_token)

    def from_subtokens(self, subtokens: Tensor) -> Tensor:
        """[B, L*F, G] -> [B, L, D]; inverse of `to_subtokens`."""
        return rearrange(subtokens, "b (l r) j -> b l (j r)", r=self.ids_per_token)

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
        losses = self.losses(code, quantized) if with_losses else None
        return QuantizerOutput(codes=codes, indices=self.codes_to_indices(quantized), losses=losses)

    def losses(self, code: Tensor, quantized: Tensor) -> QuantizerLosses:
        with torch.autocast(code.device.type, enabled=False):
            per_sample, codebook = self.entropy_terms(code.float())
            commitment = (code.float() - quantized.float()).pow(2).mean()
        entropy = per_sample - codebook
        terms = {"entropy": entropy, "commitment": commitment}
        return QuantizerLosses({**terms, "per_sample_entropy": per_sample, "codebook_entropy": codebook})

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


class FSQ(Quantizer):
    """Finite scalar quantization (Mentzer et al. 2023): bound each channel with tanh to its level
    count, round with a straight-through estimator, rescale to [-1, 1]. One index per token."""

    def __init__(self, levels: tuple[int, ...]):
        super().__init__()
        self.levels = tuple(levels)
        self.code_dim = len(levels)
        self.bits_per_token = float(sum(math.log2(level) for level in levels))
        # one int64 id per token only while the codebook fits (8^24 levels = 72 bits does not): otherwise no ids
        size = math.prod(self.levels)
        self.codebook_size, self.ids_per_token = (size, 1) if size < 2**63 else (None, 0)
        self.register_buffer("level_counts", torch.tensor(levels, dtype=torch.float32), persistent=False)
        basis = torch.cumprod(torch.tensor((1,) + tuple(levels[:-1]), dtype=torch.int64), dim=0)
        self.register_buffer("basis", basis, persistent=False)

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
        indices = self.codes_to_indices(codes) if self.has_ids else None
        return QuantizerOutput(codes, indices, self.zero_losses(code) if with_losses else None)

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        half_width = torch.div(self.level_counts, 2, rounding_mode="floor")
        digits = (codes.float() * half_width + half_width).round().long()  # [B, L, D] in [0, L_d)
        return (digits * self.basis).sum(dim=-1)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        if not self.has_ids:
            return super().indices_to_codes(indices)
        half_width = torch.div(self.level_counts, 2, rounding_mode="floor")
        digits = (indices[..., None] // self.basis) % self.level_counts.long()
        return (digits.float() - half_width) / half_width


class ContinuousCode(Quantizer):
    """No quantization: the decoder reads the encoder's continuous code (ablation / continuous variant)."""

    def __init__(self, code_dim: int):
        super().__init__()
        self.code_dim = code_dim

    def forward(self, code: Tensor, with_losses: bool = True) -> QuantizerOutput:
        return QuantizerOutput(code, None, self.zero_losses(code) if with_losses else None)


# config.quantizer -> the quantizer of a FlowMoConfig: the one place a quantizer's name means anything.
QUANTIZERS: dict[str, Callable[..., Quantizer]] = {
    "lfq": lambda config: LFQ(config.code_dim, config.entropy_group_bits, config.entropy_temperature),
    "fsq": lambda config: FSQ(config.fsq_levels),
    "none": lambda config: ContinuousCode(config.code_dim),
}


def build_quantizer(config) -> Quantizer:
    """The quantizer named by `config.quantizer` (a FlowMoConfig)."""
    return QUANTIZERS[config.quantizer](config)
