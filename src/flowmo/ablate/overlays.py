"""Axis values as config overlays: checked against the real arguments, inline ones written as files for -c."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from pathlib import Path

import lightning as L
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from flowmo.ablate.grid import Grid, Options, Value
from flowmo.config import FlowMoConfig, TransformerConfig
from flowmo.data.datamodule import FlowMoDataModule
from flowmo.errors import UserError
from flowmo.flow import SamplerSettings
from flowmo.losses import LossRecipe
from flowmo.module import FlowMoModule
from flowmo.settings import EvalSettings, InitSettings, OptimSettings

TOP_LEVEL_KEYS = ("trainer", "model", "data", "checkpoint", "seed_everything", "run_name", "runs_dir", "ckpt_path")


def overlay_mapping(value: Value, config_dir: str | Path) -> dict:
    if isinstance(value.overlay, dict):
        return value.overlay
    path = Path(config_dir) / value.overlay
    if not path.is_file():
        raise UserError(f"axis {value.axis!r} value {value.name!r} names the overlay {path}, which does not exist.")
    return yaml.safe_load(path.read_text()) or {}


def check_overlays(grid: Grid, config_dir: str | Path) -> None:
    """Every overlay file exists and every key it sets is a real argument (one sentence for the first bad one)."""
    for path in (*grid.stack, *grid.eval_stack, *grid.posttrain_stack):
        if not (Path(config_dir) / path).is_file():
            raise UserError(f"{grid.path}: the stack names {Path(config_dir) / path}, which does not exist.")
    for axis in grid.axes:
        for value in axis.values:
            bad = unknown_keys(overlay_mapping(value, config_dir))
            if bad:
                key, hint = bad[0]
                raise UserError(
                    f"{grid.path}: axis {axis.name!r} value {value.name!r} sets `{key}`, which is not a "
                    f"flowmo fit/test argument{hint}."
                )


def unknown_keys(overlay: dict) -> list[tuple[str, str]]:
    """(dotted key, ' (did you mean ...?)') for each key no flowmo component accepts."""
    known = _known_arguments()
    bad = []
    for dotted in _dotted(overlay):
        section = dotted.split(".")[0]
        if section not in TOP_LEVEL_KEYS:
            bad.append((dotted, _hint(section, TOP_LEVEL_KEYS)))
            continue
        parts = dotted.split(".")
        names = known.get(".".join(parts[:-1]))  # the fields of the section or group that holds the last key
        if names is not None and parts[-1] not in names:
            bad.append((dotted, _hint(parts[-1], names)))
    return bad


def _dotted(mapping: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in ("init_args",):
            nested = _dotted(value, dotted + ".")
            keys += nested if dotted.count(".") < 3 else [dotted]
        else:
            keys.append(dotted)
    return keys


def _hint(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _known_arguments() -> dict[str, tuple[str, ...]]:
    def arguments(target) -> tuple[str, ...]:
        return tuple(p for p in inspect.signature(target).parameters if p != "self")

    def names(dataclass) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(dataclass))

    return {
        "model": arguments(FlowMoModule.__init__),
        "data": arguments(FlowMoDataModule.__init__),
        "trainer": arguments(L.Trainer.__init__),
        "checkpoint": arguments(ModelCheckpoint.__init__),
        "model.architecture": names(FlowMoConfig),
        "model.architecture.encoder": names(TransformerConfig),
        "model.architecture.decoder": names(TransformerConfig),
        "model.loss": names(LossRecipe),
        "model.optim": names(OptimSettings),
        "model.init": names(InitSettings),
        "model.eval": names(EvalSettings),
        "model.eval.sampler": names(SamplerSettings),
    }


def overlays_dir(grid: Grid, options: Options) -> Path:
    return Path(options.results_dir) / "ablations" / grid.name / "overlays"


def overlay_file(grid: Grid, value: Value, options: Options) -> str:
    """A file path for -c: the overlay's own file, or the inline mapping written under results/ablations/."""
    if isinstance(value.overlay, str):
        return str(Path(options.config_dir) / value.overlay)
    return str(overlays_dir(grid, options) / f"{value.axis}-{value.name}.yaml")


def overlay_files(grid: Grid, values: list[Value], options: Options) -> list[str]:
    """-c files of these values; a value without an overlay (usually the base) adds none."""
    return [overlay_file(grid, value, options) for value in values if value.overlay not in ({}, None, "")]


def write_inline_overlays(grid: Grid, options: Options) -> None:
    folder = overlays_dir(grid, options)
    folder.mkdir(parents=True, exist_ok=True)
    for value in (v for a in grid.axes for v in a.values if isinstance(v.overlay, dict) and v.overlay):
        text = f"# {grid.name}: axis {value.axis}, value {value.name} ({value.label}); written from {grid.path}\n"
        Path(overlay_file(grid, value, options)).write_text(text + yaml.safe_dump(value.overlay or {}, sort_keys=False))
