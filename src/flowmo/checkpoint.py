"""The one reader of tokenizer weights, whatever file a user holds, and the writer of a light export.

    tok = from_checkpoint("runs/lo-1b/checkpoints/last.ckpt")        # a FlowMoTokenizer (flowmo.from_checkpoint)
    tok = from_official("flowmo_lo.pth")                             # the authors' layout, lo / hi inferred
    state, config = load_state("runs/lo-1b/checkpoints/last.ckpt")   # or an exported .pt, flowmo_lo.pth, "lo"
    load_into(tokenizer, state, "runs/...")                          # strict, one sentence listing bad keys

Formats, told apart by their keys (a folder: by its files):
- a save_pretrained folder (flowmo.save_pretrained, `flowmo export --out DIR`): model.safetensors +
  config.json, as huggingface_hub shares models;
- a Lightning checkpoint of FlowMoModule: `state_dict` with `tokenizer.*` (raw) and `ema.module.*` (EMA),
  and the resolved architecture under `flowmo_config`;
- an exported tokenizer (`flowmo export` / `export_tokenizer`): {"flowmo_config", "state_dict"};
- the authors' released files (flowmo_lo.pth / flowmo_hi.pth): `model_ema_state_dict` / `model_state_dict`
  under their names (flowmo.official maps them); their architecture is inferred from the shapes (or given).
A released name instead of a path ("lo", "hi") is the authors' file from their Hugging Face repository,
downloaded on first use into the Hugging Face cache (flowmo.pretrained).
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from flowmo import official, pretrained
from flowmo.config import FlowMoConfig, config_differences
from flowmo.errors import UserError
from flowmo.nn.tokenizer import FlowMoTokenizer
from flowmo.optim import weights_record

RAW_PREFIX, EMA_PREFIX = "tokenizer.", "ema.module."
# Released names: the authors' file (a flowmo.pretrained key) and the preset it must be.
RELEASES = {"lo": ("official-lo", "lo"), "hi": ("official-hi", "hi")}
WEIGHTS = ("ema", "raw")
WEIGHTS_NAME, CONFIG_NAME = "model.safetensors", "config.json"  # huggingface_hub's names for a shared model


class CheckpointNotFound(UserError, FileNotFoundError):
    """A path that is neither a file nor a released name."""


# ------------------------------------------------------------------------------------------- tokenizers
def from_checkpoint(path: str | Path, weights: str = "ema") -> FlowMoTokenizer:
    """Load any tokenizer file: a Lightning .ckpt of this package, an exported .pt or save_pretrained folder, the
    authors' .pth, or a released name ("lo", "hi"); tensors only (weights_only=True / safetensors). Weights
    load on the CPU; move the model with .to(device)."""
    return tokenizer_from(path, weights)


def from_official(
    state_dict: Mapping | str | Path, config: FlowMoConfig | Mapping | str | None = None, weights: str = "ema"
) -> FlowMoTokenizer:
    """Load the authors' weights: a state dict, a released file (flowmo_lo.pth / flowmo_hi.pth) or name (lo, hi).

    config: FlowMoConfig, the fixtures' dict schema, a preset name, or None to infer lo/hi from the
    tensor shapes. weights: "ema" (what the paper evaluates) or "raw" for released files holding both.
    """
    return tokenizer_from(state_dict, weights, config)


def tokenizer_from(source, weights: str = "ema", config=None) -> FlowMoTokenizer:
    """A FlowMoTokenizer holding `source`'s weights (load_state's formats), with the record of which weights they are
    (kept by exports)."""
    state, config = load_state(source, weights, config)
    model = FlowMoTokenizer.from_config(config)
    load_into(model, state, str(source) if isinstance(source, (str, Path)) else "the state dict")
    model.weights_record = weights_record_of(source, weights)
    return model


# ------------------------------------------------------------------------------------------- reading
def locate(source: str | Path) -> Path:
    """A weights file or save_pretrained folder on disk: `source` itself, or for a released name (lo, hi) the
    authors' file, fetched."""
    path = Path(source).expanduser()
    if path.is_file() or path.is_dir():
        return path
    if str(source) in RELEASES:
        return pretrained.fetch(RELEASES[str(source)][0])
    raise CheckpointNotFound(
        f"No checkpoint at {str(source)!r}; pass the path of a .ckpt, an exported .pt, an "
        "official .pth or a save_pretrained folder, or a released tokenizer name: "
        f"{', '.join(RELEASES)}."
    )


def read_checkpoint(source: str | Path | Mapping, map_location="cpu") -> Mapping:
    """The loaded dict of a checkpoint file (a dict passes through)."""
    if isinstance(source, Mapping):
        return source
    return load_weights_file(locate(source), map_location)


def load_weights_file(path: str | Path, map_location="cpu", mmap: bool = False) -> Mapping:
    """torch.load restricted to tensors and plain values: a pickle that would run code is refused, unread, and a
    file torch cannot read at all (cut short, an error page saved as .pth) is named as such. `mmap` reads what a
    caller needs of a big file without reading its weights (a legacy non-zip file is read whole)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        if re.search(r"\bGLOBAL\b", str(error)):  # the unpickler met a callable: a payload, not damage
            raise UnsafeWeightsError(path) from None
        raise UnreadableWeightsError(path) from None
    except RuntimeError as error:
        if mmap and "mmap can only be used" in str(error):
            return load_weights_file(path, map_location)
        raise UnreadableWeightsError(path) from None
    except EOFError:
        raise UnreadableWeightsError(path) from None


class UnreadableWeightsError(UserError):
    """A file torch cannot read as a weights file at all."""

    def __init__(self, path: str | Path):
        super().__init__(
            f"{path} is not a readable torch weights file (cut short, corrupt, or another format); download or "
            "copy it again, or pass another file."
        )


class UnsafeWeightsError(UserError):
    """A weights file holding pickled objects beyond tensors and plain values (it could run code when read)."""

    def __init__(self, path: str | Path):
        super().__init__(
            f"{path} holds pickled Python objects that could run code when loaded, so flowmo refused to "
            "read it; ask its author for a save_pretrained folder (model.safetensors + config.json), "
            "or, only if you trust its source, re-save its tensors alone with torch.save."
        )


def release_preset(source) -> str | None:
    """The preset a released name must load as ("lo" -> lo), so a wrong file is refused naming it."""
    return RELEASES[source][1] if isinstance(source, str) and source in RELEASES and not Path(source).exists() else None


def load_state(
    source: str | Path | Mapping, weights: str = "ema", config: FlowMoConfig | Mapping | str | None = None
) -> tuple[dict[str, torch.Tensor], FlowMoConfig]:
    """(tokenizer state dict in our key layout, its architecture) from any of the formats above.

    weights: "ema" (what the paper evaluates) or "raw". config: for the authors' files, the architecture to read
    them as (a FlowMoConfig, the fixtures' dict schema or a preset name); None infers lo / hi / small. A released
    name is always read as its own preset, so loading it into another architecture is refused by its config.
    """
    if weights not in WEIGHTS:
        raise UserError(f"weights must be 'ema' or 'raw', got {weights!r}.")
    if not isinstance(source, Mapping) and locate(source).is_dir():
        return read_folder(locate(source))
    checkpoint = read_checkpoint(source)
    if official.is_official(checkpoint) or "state_dict" not in checkpoint:  # a released file or a plain state dict
        state = official.extract_state_dict(checkpoint, weights)
        preset = release_preset(source)
        config = official.resolve_config(preset or config, state)
        try:
            return official.to_ours(state, config), config
        except UserError as error:
            if preset is None:
                raise
            raise UserError(
                f"{locate(source)} is not the released FlowMo-{source} (the {preset} preset): {error}"
            ) from None
    state, recorded = _our_state(checkpoint, weights)
    if recorded is None:
        raise UserError(
            f"{source} records no FlowMo config; load it with FlowMoTokenizer.from_config + load_state_dict."
        )
    return state, recorded


def read_folder(folder: Path) -> tuple[dict[str, torch.Tensor], FlowMoConfig]:
    """(state dict, architecture) of a save_pretrained folder: safetensors and JSON, so reading it runs no code."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    missing = [name for name in (WEIGHTS_NAME, CONFIG_NAME) if not (folder / name).is_file()]
    if missing:
        raise UserError(
            f"{folder} holds no {' or '.join(missing)}; give a folder written by save_pretrained or "
            "`flowmo export --out DIR`."
        )
    try:
        config = FlowMoConfig.from_dict(json.loads((folder / CONFIG_NAME).read_text()))
        return load_file(folder / WEIGHTS_NAME), config
    except (json.JSONDecodeError, TypeError, SafetensorError) as error:
        raise UserError(
            f"{folder} is not a readable save_pretrained folder ({error}); write it again with save_pretrained."
        ) from None


def _our_state(checkpoint: Mapping, weights: str) -> tuple[dict[str, torch.Tensor], FlowMoConfig | None]:
    config = FlowMoConfig.from_dict(checkpoint["flowmo_config"]) if "flowmo_config" in checkpoint else None
    if "flowmo_config" in checkpoint and "epoch" not in checkpoint:
        return dict(checkpoint["state_dict"]), config  # exported tokenizer: only one set of weights
    prefix = EMA_PREFIX if weights == "ema" else RAW_PREFIX
    state = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise UserError(f"the checkpoint holds no {weights} weights (no keys starting with {prefix!r}).")
    return state, config


def load_into(model: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Strict load with one ValueError that lists every unknown, missing and misshaped key, and refuses
    non-finite weights."""
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    official.check_keys(state, expected)
    require_finite(state, what)
    model.load_state_dict(state, strict=True)


def load_initial_weights(tokenizer: torch.nn.Module, source, weights: str = "ema", parts: str = "all") -> None:
    """Weights only (no optimizer, no step) into `tokenizer`: how Stage 1B starts from Stage 1A. parts="encoder"
    takes the encoder alone (a pre-trained encoder under a fresh decoder). `source` may be a released name."""
    state, config = load_state(source, weights, config=tokenizer.config)
    if config != tokenizer.config:
        raise UserError(
            f"init_weights {source} has another architecture than the configured one "
            f"({'; '.join(config_differences(config, tokenizer.config))}); use that file's model config."
        )
    if parts == "encoder":
        state = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
        load_into(tokenizer.encoder, state, str(source))
    else:
        load_into(tokenizer, state, str(source))


def require_finite(state: Mapping[str, torch.Tensor], what: str) -> None:
    """A tokenizer with a NaN or Inf weight decodes garbage: refuse it with the name of the first bad tensor."""
    bad = next(
        (k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()),
        None,
    )
    if bad is not None:
        raise UserError(
            f"{what}: the weight {bad} holds NaN or Inf values (a diverged run); use an earlier checkpoint of the run."
        )


# ------------------------------------------------------------------------------------------- writing
def export_tokenizer(tokenizer, path: str | Path) -> Path:
    """Write {"flowmo_config", "state_dict"}: what downstream users need, without optimizer or EMA copies."""
    path = Path(path)
    require_finite(tokenizer.state_dict(), f"not exporting to {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "flowmo_config": tokenizer.config.to_dict(),
            "state_dict": tokenizer.state_dict(),
            **record_metadata(tokenizer),
        },
        path,
    )
    return path


# ------------------------------------------------------------------------------------------- provenance
RECORD_KEY = "flowmo_weights"  # where an export keeps flowmo.optim.weights_record (a .pt key, safetensors metadata)


def weights_record_of(source, weights: str = "ema") -> dict:
    """Which weights `source` holds (flowmo.optim.weights_record): for a .ckpt of this package its step and EMA
    updates, for an export what it recorded when written; otherwise only `weights` (e.g. the authors' files)."""
    path = Path(source).expanduser() if isinstance(source, (str, Path)) else None
    if path is None or not path.exists():
        return weights_record(weights)
    if path.is_dir():
        return _folder_record(path) or weights_record(weights)
    saved = load_weights_file(path, mmap=True)  # the metadata without reading gigabytes of weights
    if RECORD_KEY in saved:
        return json.loads(saved[RECORD_KEY])
    if "hyper_parameters" in saved and "global_step" in saved:
        return weights_record(weights, saved["hyper_parameters"], int(saved["global_step"]))
    return weights_record(weights)


def _folder_record(folder: Path) -> dict | None:
    from safetensors import safe_open

    try:
        with safe_open(folder / WEIGHTS_NAME, framework="pt") as weights_file:
            text = (weights_file.metadata() or {}).get(RECORD_KEY)
    except Exception:  # noqa: BLE001 - an unreadable folder is reported by the loader itself
        return None
    return json.loads(text) if text else None


def record_metadata(tokenizer) -> dict[str, str]:
    """The tokenizer's weights record (set by tokenizer_from) as string metadata for an export."""
    record = getattr(tokenizer, "weights_record", None)
    return {RECORD_KEY: json.dumps(record)} if record else {}
