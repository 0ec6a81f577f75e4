"""Named FlowMo configurations (method §1.1).

- `lo`:    FlowMo-Lo, 18 bits/token in 2 groups of 9 -> 0.070 bits per pixel, 945.4M parameters.
- `hi`:    FlowMo-Hi, 56 bits/token in 4 groups of 14 -> 0.219 bits per pixel, 945.5M parameters.
- `small`: the paper's ablation base ("fewer params", Table 4/6): patch 8, decoder width 768, 517.1M.
- `tiny`:  32x32 images, two blocks per stack; CPU tests (same shapes as fixture A).
- `cpu-mid`: a mid-size network for CPU speed comparisons (`make bench PRESET=cpu-mid`): 64x64 images, patch 4
           (256 image tokens), 64 tokens of 18 bits (2 groups of 9), encoder and decoder width 384 (12 heads of
           32, RoPE axes 4/14/14), depths 2 and 4. Big enough that matmuls, not Python, set the pace.
- `demo`:  `tiny`'s network for `make demo` on a CPU, with 72 bits per token (8 groups of 9: 1.125 bits per
           pixel at 32x32) and RoPE theta 100. Measured on the demo's held-out photos: 18 -> 54 bits per
           token +1.7 dB after 2000 steps, 72 bits with theta 100 +0.5 dB more (a 32 px thumbnail of a whole
           photo carries far more detail per pixel than a 256 px ImageNet crop, and theta 10000 leaves most
           RoPE frequencies constant over an 8x8 patch grid).

Widths are width_multiplier * 192 and RoPE axes (8, 28, 28) * width_multiplier / 4, as in the
authors' code (encoder multiplier 4, decoder 6).
"""

from __future__ import annotations

from typing import Any

from flowmo.config import FlowMoConfig, TransformerConfig
from flowmo.errors import UserError

_ENCODER_768 = TransformerConfig(width=768, depth=8, heads=12, rope_axes=(8, 28, 28))
_DECODER_1152 = TransformerConfig(width=1152, depth=16, heads=12, rope_axes=(12, 42, 42))
_DECODER_768 = TransformerConfig(width=768, depth=16, heads=12, rope_axes=(8, 28, 28))

_TINY = FlowMoConfig(
    image_size=32,
    patch_size=4,
    code_length=16,
    code_dim=18,
    entropy_group_bits=9,
    encoder=TransformerConfig(width=64, depth=2, heads=2, rope_axes=(4, 14, 14)),
    decoder=TransformerConfig(width=128, depth=2, heads=2, rope_axes=(8, 28, 28)),
)

_ENCODER_384 = TransformerConfig(width=384, depth=2, heads=12, rope_axes=(4, 14, 14))

_PRESETS: dict[str, FlowMoConfig] = {
    "lo": FlowMoConfig(code_dim=18, entropy_group_bits=9, encoder=_ENCODER_768, decoder=_DECODER_1152),
    "hi": FlowMoConfig(code_dim=56, entropy_group_bits=14, encoder=_ENCODER_768, decoder=_DECODER_1152),
    "small": FlowMoConfig(patch_size=8, code_dim=18, entropy_group_bits=9, encoder=_ENCODER_768, decoder=_DECODER_768),
    "tiny": _TINY,
    "cpu-mid": FlowMoConfig(
        image_size=64,
        patch_size=4,
        code_length=64,
        code_dim=18,
        entropy_group_bits=9,
        encoder=_ENCODER_384,
        decoder=TransformerConfig(width=384, depth=4, heads=12, rope_axes=(4, 14, 14)),
    ),
    "demo": _TINY.replace(code_dim=72, rope_theta=100.0),
}


def names() -> list[str]:
    """The preset names, e.g. for a command-line choice."""
    return list(_PRESETS)


def get(name: str) -> FlowMoConfig:
    """The configuration of preset `name` (configs are frozen: use `.replace(...)` to derive one)."""
    if name not in _PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {names()}.")
    return _PRESETS[name]


def resolve_config(preset: str, overrides: dict[str, Any] | None = None) -> FlowMoConfig:
    """A named preset with some fields replaced; `encoder` / `decoder` overrides merge key by key.

    e.g. resolve_config("small", {"patch_size": 16}) for the paper's "2x patch size" ablation.
    """
    values = get(preset).to_dict()
    for key, value in (overrides or {}).items():
        if key in ("encoder", "decoder") and isinstance(value, dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    return FlowMoConfig.from_dict(values)
