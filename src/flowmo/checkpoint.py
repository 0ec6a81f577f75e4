"""Reading tokenizer weights from any file a user may hold, and exporting a light one.

Formats told apart by their keys:
- a Lightning checkpoint of FlowMoModule: `state_dict` with `tokenizer.*` (raw) and `ema.module.*` (EMA),
  and the resolved architecture under `flowmo_config`;
- an exported tokenizer (`flowmo export` / `export_tokenizer`): {"flowmo_config", "state_dict"};
- the authors' released files (flowmo_lo.pth / flowmo_hi.pth): `model_ema_state_dict` / `model_state_dict`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flowmo.config import FlowMoConfig

RAW_PREFIX, EMA_PREFIX = "tokenizer.", "ema.module."


def read_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {str(path)!r}; pass the path of a .ckpt, exported .pt or official .pth.")
    return torch.load(path, map_location=map_location, weights_only=False)


def is_official(checkpoint: dict) -> bool:
    return "model_ema_state_dict" in checkpoint or "model_state_dict" in checkpoint


def tokenizer_state(checkpoint: dict, weights: str = "ema") -> tuple[dict[str, torch.Tensor], FlowMoConfig | None]:
    """(tokenizer state dict in our key layout, its config if recorded) from a loaded checkpoint dict."""
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}.")
    config = FlowMoConfig.from_dict(checkpoint["flowmo_config"]) if "flowmo_config" in checkpoint else None
    if "state_dict" in checkpoint and "flowmo_config" in checkpoint and "epoch" not in checkpoint:
        return dict(checkpoint["state_dict"]), config  # exported tokenizer: only one set of weights
    if "state_dict" not in checkpoint:
        raise ValueError("this file is neither a FlowMoModule checkpoint nor an exported tokenizer; "
                         "for the authors' .pth files use FlowMoTokenizer.from_official.")
    prefix = EMA_PREFIX if weights == "ema" else RAW_PREFIX
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"the checkpoint holds no {weights} weights (no keys starting with {prefix!r}).")
    return state, config


def load_tokenizer_checkpoint(cls, path: str | Path, weights: str = "ema", map_location="cpu"):
    checkpoint = read_checkpoint(path, map_location)
    if is_official(checkpoint):
        return cls.from_official(checkpoint, weights=weights)
    state, config = tokenizer_state(checkpoint, weights)
    if config is None:
        raise ValueError(f"{path} records no FlowMo config; load it with FlowMoTokenizer.from_config + load_state_dict.")
    require_finite(state, str(path))
    model = cls.from_config(config)
    model.load_state_dict(state, strict=True)
    return model


def require_finite(state: dict[str, torch.Tensor], what: str) -> None:
    """A tokenizer with a NaN or Inf weight decodes garbage: refuse it with the name of the first bad tensor."""
    bad = next((k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()
                and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise ValueError(f"{what}: the weight {bad} holds NaN or Inf values (a diverged run); use an earlier "
                         "checkpoint of the run.")


def export_tokenizer(tokenizer, path: str | Path) -> Path:
    """Write {"flowmo_config", "state_dict"}: what downstream users need, without optimizer or EMA copies."""
    path = Path(path)
    require_finite(tokenizer.state_dict(), f"not exporting to {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"flowmo_config": tokenizer.config.to_dict(), "state_dict": tokenizer.state_dict()}, path)
    return path
