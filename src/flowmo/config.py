"""Typed configuration of a FlowMo tokenizer (method §1.1).

The field names follow the schema of the configuration dicts of the reference fixtures (tests/fixtures/), so
such a dict converts with `FlowMoConfig.from_dict`. Constructors check every invariant
the network relies on and raise `ValueError` with the offending numbers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from flowmo.errors import UserError

QUANTIZERS = ("lfq", "fsq", "none")
ATTENTION_SCALES = ("8/head_dim", "1/sqrt(head_dim)")
# Loss weights the authors' configs (and checkpoints written before losses.LossRecipe owned them) keep beside the
# architecture: read and dropped here, since the recipe of the stage being trained sets them.
LOSS_WEIGHT_KEYS = ("entropy_loss_weight", "commit_loss_weight")


@dataclass(frozen=True)
class TransformerConfig:
    """One MMDiT stack (encoder or decoder): width, depth (double blocks), heads, RoPE axis dims."""

    width: int
    depth: int
    heads: int
    rope_axes: tuple[int, int, int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "rope_axes", tuple(int(a) for a in self.rope_axes))
        if self.width <= 0 or self.depth <= 0 or self.heads <= 0:
            raise UserError(f"width, depth and heads must be positive, got {self.width}, {self.depth}, {self.heads}.")
        if self.width % self.heads:
            raise UserError(f"width {self.width} is not divisible by heads {self.heads}; pick a width that is.")
        if len(self.rope_axes) != 3:
            raise UserError(f"rope_axes needs 3 entries (latent index, row, column), got {list(self.rope_axes)}.")
        if any(a <= 0 or a % 2 for a in self.rope_axes):
            raise UserError(f"every RoPE axis dim must be positive and even, got {list(self.rope_axes)}.")
        if sum(self.rope_axes) != self.head_dim:
            raise UserError(
                f"RoPE axes {list(self.rope_axes)} sum to {sum(self.rope_axes)} but head_dim is "
                f"{self.width}/{self.heads}={self.head_dim}; they must be equal."
            )

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


def _as_transformer(value: TransformerConfig | dict[str, Any]) -> TransformerConfig:
    return value if isinstance(value, TransformerConfig) else TransformerConfig(**value)


@dataclass(frozen=True)
class FlowMoConfig:
    """Architecture + quantizer of one FlowMo tokenizer.

    `image_size` is the training resolution; the network itself accepts any H, W divisible by
    `patch_size`. `code_dim` is the number of channels per latent token: bits per token for LFQ,
    `len(fsq_levels)` for FSQ, continuous channels for `quantizer="none"`.
    """

    image_size: int = 256
    patch_size: int = 4
    code_length: int = 256
    code_dim: int = 18
    encoder: TransformerConfig = field(default_factory=lambda: TransformerConfig(768, 8, 12, (8, 28, 28)))
    decoder: TransformerConfig = field(default_factory=lambda: TransformerConfig(1152, 16, 12, (12, 42, 42)))
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    rope_theta: float = 10000.0
    attention_scale: str = "8/head_dim"
    quantizer: str = "lfq"
    entropy_group_bits: int = 9
    entropy_temperature: float = 0.1
    fsq_levels: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "encoder", _as_transformer(self.encoder))
        object.__setattr__(self, "decoder", _as_transformer(self.decoder))
        if self.fsq_levels is not None:
            object.__setattr__(self, "fsq_levels", tuple(int(v) for v in self.fsq_levels))
        self._check_geometry()
        self._check_quantizer()

    def _check_geometry(self) -> None:
        if self.patch_size <= 0 or self.image_size % self.patch_size:
            raise UserError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}; "
                "choose a patch size that divides the image."
            )
        if self.code_length <= 0 or self.code_dim <= 0:
            raise UserError(f"code_length and code_dim must be positive, got {self.code_length}, {self.code_dim}.")
        if self.attention_scale not in ATTENTION_SCALES:
            raise UserError(f"attention_scale must be one of {ATTENTION_SCALES}, got {self.attention_scale!r}.")

    def _check_quantizer(self) -> None:
        if self.quantizer not in QUANTIZERS:
            raise UserError(f"quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}.")
        if self.quantizer == "lfq" and (self.entropy_group_bits <= 0 or self.code_dim % self.entropy_group_bits):
            raise UserError(
                f"code_dim {self.code_dim} is not divisible by entropy_group_bits {self.entropy_group_bits}; "
                "use a group size that divides the bits per token (9 for 18, 14 for 56)."
            )
        if self.quantizer == "lfq" and self.entropy_group_bits > 20:
            raise UserError(f"entropy_group_bits {self.entropy_group_bits} needs a 2^G softmax; keep G <= 20.")
        if self.quantizer == "fsq":
            if not self.fsq_levels or any(level < 2 for level in self.fsq_levels):
                raise UserError(f"FSQ needs fsq_levels with every level >= 2, got {self.fsq_levels}.")
            if len(self.fsq_levels) != self.code_dim:
                raise UserError(
                    f"FSQ has one channel per level: code_dim {self.code_dim} != len(fsq_levels) "
                    f"{len(self.fsq_levels)}; set code_dim={len(self.fsq_levels)}."
                )

    # ----------------------------------------------------------------------------------------- derived
    @property
    def groups_per_token(self) -> int:
        """F = D / G for LFQ: sub-tokens per latent token (2 for Lo, 4 for Hi); 1 for FSQ."""
        return self.code_dim // self.entropy_group_bits if self.quantizer == "lfq" else 1

    @property
    def codebook_bits(self) -> int | None:
        """G, the bits of an LFQ sub-token whose 2^G codes the codebook statistics count (None: no LFQ)."""
        return self.entropy_group_bits if self.quantizer == "lfq" else None

    @property
    def bits_per_token(self) -> float:
        if self.quantizer == "lfq":
            return float(self.code_dim)
        if self.quantizer == "fsq":
            return float(sum(math.log2(level) for level in self.fsq_levels))
        return float("inf")

    @property
    def bits_per_pixel(self) -> float:
        return self.bits_per_pixel_at(self.image_size, self.image_size)

    def bits_per_pixel_at(self, height: int, width: int) -> float:
        """The same code spread over a height x width image (evaluated at another size than the training one)."""
        return self.code_length * self.bits_per_token / (height * width)

    # ------------------------------------------------------------------------------------- conversion
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "FlowMoConfig":
        """Build from a plain dict (the fixtures' schema, a YAML file, a checkpoint's hyper-parameters)."""
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in values.items() if k not in LOSS_WEIGHT_KEYS}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown FlowMo config keys {unknown}; valid keys are {sorted(known)}.")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["encoder"]["rope_axes"] = list(self.encoder.rope_axes)
        values["decoder"]["rope_axes"] = list(self.decoder.rope_axes)
        if self.fsq_levels is not None:
            values["fsq_levels"] = list(self.fsq_levels)
        return values

    def replace(self, **changes: Any) -> "FlowMoConfig":
        return replace(self, **changes)


def fsq_levels_for_bits(bits: int) -> tuple[int, ...]:
    """FSQ levels with exactly `bits` bits per token: as many 8-level channels as fit, then 4 or 2.

    Used by the FSQ-vs-LFQ ablation so both quantizers spend the same bits per token.
    """
    if bits <= 0:
        raise UserError(f"bits must be positive, got {bits}.")
    levels = [8] * (bits // 3)
    remainder = bits % 3
    if remainder:
        levels.append(2**remainder)
    return tuple(levels)


def config_differences(theirs: FlowMoConfig, ours: FlowMoConfig) -> list[str]:
    """'field: theirs -> ours' for every architecture field that differs (encoder./decoder. fields flattened)."""

    def flat(config: FlowMoConfig) -> dict[str, Any]:
        values = {}
        for key, value in config.to_dict().items():
            if isinstance(value, dict):
                values.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                values[key] = value
        return values

    a, b = flat(theirs), flat(ours)
    return [f"{key}: {a.get(key)} -> {b.get(key)}" for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]
