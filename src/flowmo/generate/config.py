"""MaskGIT generator configuration: the token layout it models and the transformer's size, with named presets.

Token layout (method §2): an image is L tokens, each split into F sub-tokens of G bits, stored as ids
[B, L*F] where token tau owns positions tau*F .. tau*F+F-1 (FlowMo-Lo: L=256, F=2, 2^9 ids per sub-token).

Presets (the architecture only; the layout comes from the token shards):
- `tiny`: CPU tests and the sample set: width 64, 2 layers, 2 heads, no dropout.
- `paper`: MaskGIT's transformer (Chang et al. 2022, section 4.1): 24 layers, 8 heads, width 768, MLP 3072,
  dropout 0.1, label smoothing 0.1, learned positional embeddings, truncated-normal(0.02) initialisation.
  The FlowMo paper (method §7.1, Table 2) says only "MaskGiT, about 300 epochs"; it does not state the generator's
  size, so MaskGIT's own configuration is used. Class dropout 0.1 for classifier-free guidance is not in MaskGIT
  (it has no CFG); 0.1 is the usual choice of later class-conditional MaskGIT-style models and is our default.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from flowmo.errors import UserError


@dataclass(frozen=True)
class TokenLayout:
    """What the generator models: `tokens` x `groups` sub-token ids, each in [0, codebook_size)."""

    tokens: int
    groups: int
    codebook_size: int
    num_classes: int

    def __post_init__(self) -> None:
        for name in ("tokens", "groups", "codebook_size", "num_classes"):
            if getattr(self, name) < 1:
                raise ValueError(f"TokenLayout.{name} must be >= 1, got {getattr(self, name)}.")

    @property
    def ids_per_image(self) -> int:
        return self.tokens * self.groups

    @classmethod
    def from_dict(cls, values: dict) -> "TokenLayout":
        return cls(**{key: int(values[key]) for key in ("tokens", "groups", "codebook_size", "num_classes")})


@dataclass(frozen=True)
class MaskGITConfig:
    width: int
    depth: int
    heads: int
    mlp_ratio: float = 4.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be divisible by heads {self.heads}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}.")

    def to_dict(self) -> dict:
        return asdict(self)


_PRESETS = {
    "tiny": MaskGITConfig(width=64, depth=2, heads=2, mlp_ratio=4.0, dropout=0.0),
    "paper": MaskGITConfig(width=768, depth=24, heads=8, mlp_ratio=4.0, dropout=0.1),  # MaskGIT section 4.1
}

# Training recipe per preset (MaskGITModule defaults). paper: Adam betas 0.9 / 0.96 and label smoothing 0.1 from
# MaskGIT section 4.1; lr 1e-4, weight decay 0.045 (and the yaml's batch 256, warm-up 5000) as we recall MaskGIT's
# released class-conditional config: not re-checked against it here. The 300 epochs are FlowMo's (method §7.1).
RECIPES = {
    "tiny": dict(lr=1e-3, betas=(0.9, 0.96), weight_decay=0.0, label_smoothing=0.0, class_dropout=0.1),
    "paper": dict(lr=1e-4, betas=(0.9, 0.96), weight_decay=0.045, label_smoothing=0.1, class_dropout=0.1),
}


def preset_names() -> list[str]:
    return list(_PRESETS)


def resolve(preset: str, overrides: dict | None = None) -> MaskGITConfig:
    """A preset's architecture with single fields overridden (`--model.architecture '{"depth": 4}'`)."""
    if preset not in _PRESETS:
        raise UserError(f"unknown generator preset {preset!r}; choose one of {preset_names()}.")
    unknown = set(overrides or {}) - set(MaskGITConfig.__dataclass_fields__)
    if unknown:
        raise UserError(
            f"unknown generator architecture keys {sorted(unknown)}; valid keys are "
            f"{sorted(MaskGITConfig.__dataclass_fields__)}."
        )
    return replace(_PRESETS[preset], **(overrides or {}))
