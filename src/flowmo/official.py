"""Key map for the authors' released checkpoints (flowmo_lo.pth, flowmo_hi.pth) and fixtures.

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
Anything else unknown, missing or of the wrong shape is an error that lists the keys.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from flowmo import presets
from flowmo.config import FlowMoConfig

_STREAM_KEY = re.compile(r"\.(img|txt)_(attn|mlp|mod)\.")
_OURS_STREAM_KEY = re.compile(r"\.(img|txt)\.(attn|mlp|mod)\.")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


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
    return {**_linear(f"{prefix}_attn.proj", width, width), **_linear(f"{prefix}_mlp.0", width, hidden),
            **_linear(f"{prefix}_mlp.2", hidden, width)}


def _linear(prefix: str, fan_in: int, fan_out: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (fan_out, fan_in), f"{prefix}.bias": (fan_out,)}


def official_shapes(config: FlowMoConfig) -> dict[str, tuple[int, ...]]:
    """Every key of an official state dict for `config`, with its shape (built on the meta device)."""
    from flowmo.nn.tokenizer import FlowMoTokenizer

    model = FlowMoTokenizer.from_config(config, device="meta")
    shapes = {ours_to_official(k): tuple(v.shape) for k, v in model.state_dict().items()}
    shapes.update(dropped_official_shapes(config))
    return shapes


def official_parameter_count(config: FlowMoConfig) -> int:
    """Parameters of the authors' module layout (the paper's 945M / 517M), unused ones included."""
    total = 0
    for shape in official_shapes(config).values():
        total += int(torch.Size(shape).numel())
    return total


def extract_state_dict(source: dict | str | Path, weights: str = "ema") -> dict[str, torch.Tensor]:
    """The raw tensor dict from a released file / a training checkpoint dict / a plain state dict."""
    if isinstance(source, (str, Path)):
        source = torch.load(source, map_location="cpu", weights_only=True)
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}.")
    wanted = "model_ema_state_dict" if weights == "ema" else "model_state_dict"
    if wanted in source:
        source = source[wanted]
    elif "model_state_dict" in source or "model_ema_state_dict" in source:
        raise ValueError(f"this checkpoint has no {wanted!r}; load it with the other weights= choice.")
    return {_strip_wrappers(k): v for k, v in source.items()}


def _strip_wrappers(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name.replace("._orig_mod.", ".")


def infer_config(state_dict: dict[str, torch.Tensor]) -> FlowMoConfig:
    """lo or hi from the code width (encoder.txt_in is [width, code_dim]) and the patch size."""
    code_dim = state_dict["encoder.txt_in.weight"].shape[1]
    patch_dim = state_dict["encoder.img_in.weight"].shape[1]
    for name in ("lo", "hi", "small"):
        candidate = presets.get(name)
        if candidate.code_dim == code_dim and 3 * candidate.patch_size**2 == patch_dim:
            shapes = official_shapes(candidate)
            if all(tuple(state_dict[k].shape) == s for k, s in shapes.items() if k in state_dict):
                return candidate
    raise ValueError(f"cannot infer the FlowMo config (code_dim {code_dim}, patch dim {patch_dim}); pass config=.")


def _resolve_config(config, state_dict) -> FlowMoConfig:
    if config is None:
        return infer_config(state_dict)
    if isinstance(config, str):
        return presets.get(config)
    if isinstance(config, dict):
        return FlowMoConfig.from_dict(config)  # the fixtures' schema uses our field names
    return config


def check_keys(state_dict: dict[str, torch.Tensor], config: FlowMoConfig) -> None:
    expected = official_shapes(config)
    unknown = sorted(set(state_dict) - set(expected))
    missing = sorted(set(expected) - set(state_dict))
    wrong = sorted(k for k in set(expected) & set(state_dict) if tuple(state_dict[k].shape) != expected[k])
    problems = []
    if unknown:
        problems.append(f"unknown keys {unknown}")
    if missing:
        problems.append(f"missing keys {missing}")
    if wrong:
        problems.append("wrong shapes " + ", ".join(f"{k}: {tuple(state_dict[k].shape)} != {expected[k]}" for k in wrong))
    if problems:
        raise ValueError("this is not an official FlowMo state dict for the given config: " + "; ".join(problems)
                         + ". Check that config matches the checkpoint (lo: code_dim 18, hi: code_dim 56).")


def load_official(cls, source, config=None, weights: str = "ema"):
    state_dict = extract_state_dict(source, weights)
    config = _resolve_config(config, state_dict)
    check_keys(state_dict, config)
    dropped = dropped_official_shapes(config)
    ours = {official_to_ours(k): v for k, v in state_dict.items() if k not in dropped}
    model = cls.from_config(config)
    model.load_state_dict(ours, strict=True)
    return model
