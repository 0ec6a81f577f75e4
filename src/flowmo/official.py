"""Key map for the authors' released checkpoints (flowmo_lo.pth, flowmo_hi.pth) and fixtures: names only.

Their module tree and ours hold the same tensors under two differences:
1. Each stream of a double block is grouped in ours: `img_attn.qkv` -> `img.attn.qkv`, `txt_mlp.0` ->
   `txt.mlp.0`, `img_mod.lin` -> `img.mod.lin`.
2. Ours does not build parameters that take no part in the forward pass (so DDP needs no
   find_unused_parameters). The loader drops exactly these official keys (`dropped_official_shapes`):
   - encoder.time_in.*                               (the encoder is called with t=None)
   - encoder.double_blocks.*.{img,txt}_mod.lin.*     (no adaLN without t)
   - encoder.final_layer_img.*                       (the encoder's image head is never read)
   - encoder.final_layer_txt.adaLN_modulation.*      (no adaLN without t)
   - decoder.final_layer_txt.*                       (the decoder's code head is never read)
   - encoder.double_blocks.<last>.img_{attn.proj,mlp}.*  (the encoder's last image-stream update is never read)
   - decoder.double_blocks.<last>.txt_{attn.proj,mlp}.*  (the decoder's last code-stream update is never read)
Anything else unknown, missing or of the wrong shape is an error that lists the keys (`check_keys`, run by
flowmo.checkpoint.load_into against the model the weights go into).

This module knows the authors' names, not our network (`flowmo.nn.tokenizer.official_shapes` lists a config's
official keys from a model built on the meta device).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from flowmo import presets
from flowmo.config import FlowMoConfig
from flowmo.errors import UserError

_STREAM_KEY = re.compile(r"\.(img|txt)_(attn|mlp|mod)\.")
_OURS_STREAM_KEY = re.compile(r"\.(img|txt)\.(attn|mlp|mod)\.")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
STATE_KEYS = {"ema": "model_ema_state_dict", "raw": "model_state_dict"}  # the released files' two weight sets
Shapes = Mapping[str, tuple[int, ...]]


def is_official(checkpoint: Mapping) -> bool:
    """A released file holds its weights under model_ema_state_dict / model_state_dict."""
    return any(key in checkpoint for key in STATE_KEYS.values())


def official_to_ours(name: str) -> str:
    return _STREAM_KEY.sub(r".\1.\2.", name)


def ours_to_official(name: str) -> str:
    return _OURS_STREAM_KEY.sub(r".\1_\2.", name)


def dropped_official_shapes(config: FlowMoConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the official parameters our model leaves out (see the module docstring)."""
    enc_w, dec_w = config.encoder.width, config.decoder.width
    patch_dim = 3 * config.patch_size**2
    shapes: dict[str, tuple[int, ...]] = {}
    shapes.update(_linear("encoder.time_in.in_layer", 256, enc_w))
    shapes.update(_linear("encoder.time_in.out_layer", enc_w, enc_w))
    for block in range(config.encoder.depth):
        for stream in ("img", "txt"):
            shapes.update(_linear(f"encoder.double_blocks.{block}.{stream}_mod.lin", enc_w, 6 * enc_w))
    shapes.update(_linear("encoder.final_layer_img.linear", enc_w, patch_dim))
    shapes.update(_linear("encoder.final_layer_img.adaLN_modulation.1", enc_w, 2 * enc_w))
    shapes.update(_linear("encoder.final_layer_txt.adaLN_modulation.1", enc_w, 2 * enc_w))
    shapes.update(_linear("decoder.final_layer_txt.linear", dec_w, config.code_dim + 1))
    shapes.update(_linear("decoder.final_layer_txt.adaLN_modulation.1", dec_w, 2 * dec_w))
    shapes.update(_unread_stream_update("encoder", config.encoder.depth - 1, "img", enc_w, config.mlp_ratio))
    shapes.update(_unread_stream_update("decoder", config.decoder.depth - 1, "txt", dec_w, config.mlp_ratio))
    return shapes


def _unread_stream_update(stack: str, block: int, stream: str, width: int, mlp_ratio: float) -> dict:
    """Output projection and MLP of a stream in the last block, whose result no head reads."""
    prefix, hidden = f"{stack}.double_blocks.{block}.{stream}", int(width * mlp_ratio)
    return {
        **_linear(f"{prefix}_attn.proj", width, width),
        **_linear(f"{prefix}_mlp.0", width, hidden),
        **_linear(f"{prefix}_mlp.2", hidden, width),
    }


def _linear(prefix: str, fan_in: int, fan_out: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (fan_out, fan_in), f"{prefix}.bias": (fan_out,)}


def extract_state_dict(checkpoint: Mapping, weights: str = "ema") -> dict[str, torch.Tensor]:
    """The raw tensor dict of a released file's loaded dict (EMA or raw weights), or of a plain state dict."""
    if weights not in STATE_KEYS:
        raise UserError(f"weights must be 'ema' or 'raw', got {weights!r}.")
    wanted = STATE_KEYS[weights]
    if wanted in checkpoint:
        checkpoint = checkpoint[wanted]
    elif is_official(checkpoint):
        raise UserError(f"this checkpoint has no {wanted!r}; load it with the other weights= choice.")
    return {_strip_wrappers(k): v for k, v in checkpoint.items()}


def _strip_wrappers(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name.replace("._orig_mod.", ".")


def infer_config(state_dict: Mapping[str, torch.Tensor]) -> FlowMoConfig:
    """lo, hi or small from the code width (encoder.txt_in is [width, code_dim]) and the patch size; the strict
    key check that follows confirms the rest."""
    try:
        code_dim = state_dict["encoder.txt_in.weight"].shape[1]
        patch_dim = state_dict["encoder.img_in.weight"].shape[1]
    except KeyError as missing:
        raise UserError(f"this is not a FlowMo state dict: it has no {missing} weight.") from None
    for name in ("lo", "hi", "small"):
        candidate = presets.get(name)
        if candidate.code_dim == code_dim and 3 * candidate.patch_size**2 == patch_dim:
            return candidate
    raise UserError(f"cannot infer the FlowMo config (code_dim {code_dim}, patch dim {patch_dim}); pass config=.")


def resolve_config(config: FlowMoConfig | Mapping | str | None, state_dict: Mapping[str, torch.Tensor]) -> FlowMoConfig:
    """A FlowMoConfig from what a caller passed: itself, the fixtures' dict schema, a preset name, or None (infer)."""
    if config is None:
        return infer_config(state_dict)
    if isinstance(config, str):
        return presets.get(config)
    if isinstance(config, Mapping):
        return FlowMoConfig.from_dict(dict(config))  # the fixtures' schema uses our field names
    return config


def check_keys(state_dict: Mapping[str, torch.Tensor], expected: Shapes) -> None:
    """One ValueError listing every unknown, missing and misshaped key against `expected` (key -> shape)."""
    unknown = sorted(set(state_dict) - set(expected))
    missing = sorted(set(expected) - set(state_dict))
    wrong = sorted(
        f"{k}: {tuple(state_dict[k].shape)} != {tuple(expected[k])}"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != tuple(expected[k])
    )
    problems = [
        f"{what} {_first(keys)}"
        for what, keys in (("unknown keys", unknown), ("missing keys", missing), ("wrong shapes", wrong))
        if keys
    ]
    if problems:
        raise UserError(
            "these weights do not fit the configured FlowMo architecture: "
            + "; ".join(problems)
            + ". Check that the config matches the checkpoint (lo: code_dim 18, hi: code_dim 56)."
        )


def _first(keys: list[str], shown: int = 6) -> str:
    """The first few of a long list, and how many more: a wrong architecture differs in hundreds of keys."""
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def to_ours(state_dict: Mapping[str, torch.Tensor], config: FlowMoConfig) -> dict[str, torch.Tensor]:
    """The official tensors under our names; the documented unused ones are dropped (a wrong shape among them
    means another architecture, and is refused)."""
    dropped = dropped_official_shapes(config)
    present = {k: v for k, v in state_dict.items() if k in dropped}
    check_keys(present, {k: dropped[k] for k in present})
    return {official_to_ours(k): v for k, v in state_dict.items() if k not in dropped}
