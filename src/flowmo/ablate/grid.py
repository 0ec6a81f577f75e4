"""Ablation grids as data: the grid file (configs/ablations/<grid>.yaml) and its cells.

See flowmo.ablate (the package docstring) for the file format and the commands.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flowmo.errors import UserError

KINDS = ("train", "eval", "posttrain")
MODES = ("one-at-a-time", "product")


@dataclass(frozen=True)
class Value:
    """One value of an axis: a config overlay (inline mapping, or a file under the config dir)."""

    axis: str
    name: str
    label: str
    overlay: Any  # dict (inline) | str (path relative to the config dir)
    init_from: str | None = None  # a cell whose Stage-1A checkpoint this fit starts from (model.init.weights)


@dataclass(frozen=True)
class Axis:
    name: str
    kind: str
    values: tuple[Value, ...]

    @property
    def base(self) -> Value:
        return self.values[0]


@dataclass(frozen=True)
class Cell:
    name: str
    choice: tuple[Value, ...]  # one value per axis, in axis order
    paper: dict[str, float]

    def of_kind(self, grid: "Grid", kind: str) -> list[Value]:
        return [value for axis, value in zip(grid.axes, self.choice) if axis.kind == kind]

    def changes(self, grid: "Grid") -> list[Value]:
        """The values that differ from the base."""
        return [value for axis, value in zip(grid.axes, self.choice) if value is not axis.base]


@dataclass(frozen=True)
class Grid:
    name: str
    path: Path
    title: str
    description: str
    stack: tuple[str, ...]
    eval_stack: tuple[str, ...]
    posttrain_stack: tuple[str, ...]
    steps: int | None
    posttrain_steps: int | None
    axes: tuple[Axis, ...]
    mode: str
    product_axes: tuple[str, ...]
    paper: dict[str, dict[str, float]]
    batch: dict | None = None  # {global, per_device}: with --gpus, accumulation keeps the global batch
    posttrain_batch: dict | None = None
    sample_set: dict | None = None  # build the demo's sample shards first (tiny grids)
    feature_metrics: str = "configured"  # "auto": LPIPS / rFID only where the pretrained files are cached
    per_image_metrics: bool = False  # PSNR / SSIM per image (the demo's) rather than the paper's pooled ones
    notes: str = ""
    seeds: tuple[int, ...] = (0,)  # replicates: every trained cell runs once per seed (init, data draw, noise)
    cells: tuple[Cell, ...] = field(default=())

    def cell(self, name: str) -> Cell:
        return next(c for c in self.cells if c.name == name)


def grid_dir(config_dir: str | Path) -> Path:
    return Path(config_dir) / "ablations"


def available_grids(config_dir: str | Path) -> list[str]:
    """Grid files are the YAML files of configs/ablations/ with an `axes:` key (overlays live in overlays/)."""
    names = []
    for path in sorted(grid_dir(config_dir).glob("*.yaml")):
        text = yaml.safe_load(path.read_text()) or {}
        if isinstance(text, dict) and "axes" in text:
            names.append(path.stem)
    return names


def load_grid(name: str, config_dir: str | Path = "configs") -> Grid:
    """Parse and check configs/ablations/<name>.yaml (or a path); bad input raises UserError, one sentence."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else grid_dir(config_dir) / f"{name}.yaml"
    if not path.is_file():
        grids = ", ".join(available_grids(config_dir)) or "none"
        raise UserError(f"no ablation grid {name!r} ({path} does not exist); the grids are: {grids}.")
    raw = yaml.safe_load(path.read_text()) or {}
    where = str(path)
    unknown = set(raw) - {
        "title",
        "description",
        "stack",
        "eval_stack",
        "posttrain",
        "steps",
        "axes",
        "cells",
        "product_axes",
        "paper",
        "sample_set",
        "feature_metrics",
        "notes",
        "batch",
        "per_image_metrics",
        "seeds",
    }
    if unknown:
        raise UserError(f"{where}: unknown key(s) {sorted(unknown)}; see configs/ablations/README.md for the format.")
    axes = tuple(_axis(entry, where) for entry in _require(raw, "axes", list, where))
    if len({a.name for a in axes}) != len(axes):
        raise UserError(f"{where}: two axes share a name; give each axis its own name.")
    if sum(a.kind == "posttrain" for a in axes) > 1:
        raise UserError(f"{where}: at most one axis may have kind posttrain.")
    mode = raw.get("cells", "one-at-a-time")
    if mode not in MODES:
        raise UserError(f"{where}: cells must be one of {MODES}, got {mode!r}.")
    product_axes = tuple(raw.get("product_axes") or [a.name for a in axes])
    missing_axes = [a for a in product_axes if a not in {axis.name for axis in axes}]
    if missing_axes:
        raise UserError(f"{where}: product_axes names {missing_axes}, which are not axes of this grid.")
    posttrain = raw.get("posttrain") or {}
    if any(a.kind == "posttrain" for a in axes) and not posttrain.get("stack"):
        raise UserError(f"{where}: a posttrain axis needs `posttrain: {{stack: [...]}}`, the Stage-1B config stack.")
    grid = Grid(
        name=path.stem,
        path=path,
        title=raw.get("title", path.stem),
        description=raw.get("description", ""),
        stack=tuple(_require(raw, "stack", list, where)),
        eval_stack=tuple(raw.get("eval_stack") or ()),
        posttrain_stack=tuple(posttrain.get("stack") or ()),
        steps=raw.get("steps"),
        posttrain_steps=posttrain.get("steps"),
        axes=axes,
        mode=mode,
        product_axes=product_axes,
        paper={str(k): dict(v) for k, v in (raw.get("paper") or {}).items()},
        batch=raw.get("batch"),
        posttrain_batch=posttrain.get("batch"),
        sample_set=raw.get("sample_set"),
        feature_metrics=raw.get("feature_metrics", "configured"),
        per_image_metrics=bool(raw.get("per_image_metrics", False)),
        notes=raw.get("notes", ""),
        seeds=_seeds(raw.get("seeds", [0]), where),
    )
    grid = dataclasses.replace(grid, cells=tuple(_cells(grid)))
    unknown_paper = set(grid.paper) - {c.name for c in grid.cells}
    if unknown_paper:
        raise UserError(f"{where}: paper numbers for {sorted(unknown_paper)}, which are not cells of this grid.")
    cell_names = {c.name for c in grid.cells}
    for value in (v for a in axes for v in a.values if v.init_from):
        if value.init_from not in cell_names:
            raise UserError(f"{where}: value {value.name!r} starts from cell {value.init_from!r}, not a cell here.")
    return grid


def _require(raw: dict, key: str, kind: type, where: str):
    if not isinstance(raw.get(key), kind):
        raise UserError(f"{where}: `{key}` must be a {kind.__name__}; see configs/ablations/README.md.")
    return raw[key]


def _seeds(raw: Any, where: str) -> tuple[int, ...]:
    """`seeds: [0, 1, 2]`: distinct integers, one replicate of every trained cell each."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = [raw]
    if (
        not isinstance(raw, list)
        or not raw
        or any(isinstance(s, bool) or not isinstance(s, int) for s in raw)
        or len(set(raw)) != len(raw)
    ):
        raise UserError(f"{where}: `seeds` must be a list of distinct integers, e.g. seeds: [0, 1, 2]; got {raw!r}.")
    return tuple(raw)


def _axis(entry: dict, where: str) -> Axis:
    if not isinstance(entry, dict) or "name" not in entry or not entry.get("values"):
        raise UserError(f"{where}: every axis needs a `name` and a non-empty list of `values`.")
    kind = entry.get("kind", "train")
    if kind not in KINDS:
        raise UserError(f"{where}: axis {entry['name']!r} has kind {kind!r}; use one of {KINDS}.")
    values = []
    for item in entry["values"]:
        if not isinstance(item, dict) or "name" not in item:
            raise UserError(f"{where}: every value of axis {entry['name']!r} needs a `name`.")
        if isinstance(item["name"], bool):  # YAML reads on/off/yes/no as booleans
            raise UserError(
                f"{where}: a value of axis {entry['name']!r} is named {item['name']}, which YAML reads "
                "from on/off/yes/no/true/false; quote it, e.g. name: 'on'."
            )
        overlay = item.get("overlay", {}) or {}
        if not isinstance(overlay, (dict, str)):
            raise UserError(f"{where}: value {item['name']!r}: overlay must be a mapping or a file path.")
        values.append(
            Value(
                entry["name"], str(item["name"]), item.get("label", str(item["name"])), overlay, item.get("init_from")
            )
        )
    if len({v.name for v in values}) != len(values):
        raise UserError(f"{where}: axis {entry['name']!r} lists a value name twice.")
    return Axis(entry["name"], kind, tuple(values))


def _cells(grid: Grid) -> list[Cell]:
    base = tuple(axis.base for axis in grid.axes)
    if grid.mode == "one-at-a-time":
        choices = [base] + [
            base[:i] + (value,) + base[i + 1 :] for i, axis in enumerate(grid.axes) for value in axis.values[1:]
        ]
    else:
        ranges = [axis.values if axis.name in grid.product_axes else (axis.base,) for axis in grid.axes]
        choices = list(itertools.product(*ranges))
    cells = []
    for choice in choices:
        changed = [v.name for axis, v in zip(grid.axes, choice) if v is not axis.base]
        cells.append(Cell("+".join(changed) or "base", choice, {}))
    names = [c.name for c in cells]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"{grid.path}: cells {duplicates} get the same name; give the axis values distinct names.")
    return [dataclasses.replace(c, paper=grid.paper.get(c.name, {})) for c in cells]


def axis_of(grid: Grid, value: Value) -> Axis:
    return next(axis for axis in grid.axes if axis.name == value.axis)


def describe(grid: Grid) -> str:
    """What `flowmo ablate list` prints: the grid's axes, then each cell and the overlays it adds."""
    lines = [
        f"{grid.name}: {grid.title}",
        f"  file {grid.path}; stack: {', '.join(grid.stack)}",
        f"  cells: {grid.mode}; axes: "
        + "; ".join(f"{a.name} [{a.kind}] = {', '.join(v.name for v in a.values)}" for a in grid.axes),
    ]
    replicates = len(grid.seeds)
    lines.append(
        f"  replicates: {replicates} (seeds {', '.join(map(str, grid.seeds))}): every trained cell runs "
        f"{replicates} time{'s' if replicates > 1 else ''}, every cell is tested once per seed"
    )
    for cell in grid.cells:
        paper = ", ".join(f"{k} {v}" for k, v in cell.paper.items())
        lines.append(f"- {cell.name}" + (f"   (paper: {paper})" if paper else ""))
        for value in cell.changes(grid):
            overlay = value.overlay if isinstance(value.overlay, str) else json.dumps(value.overlay)
            lines.append(f"    {value.axis} = {value.name} [{axis_of(grid, value).kind}]: {overlay}")
    return "\n".join(lines)


def select_cells(grid: Grid, spec: str | None) -> list[Cell]:
    """The cells named in a comma list (all of them for None); an unknown name is refused in one sentence."""
    if not spec:
        return list(grid.cells)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in {c.name for c in grid.cells}]
    if unknown:
        raise UserError(f"grid {grid.name} has no cell {unknown[0]!r}; `flowmo ablate list {grid.name}` shows them.")
    return [c for c in grid.cells if c.name in names]


@dataclass(frozen=True)
class Options:
    """Where things live and what every command gets (the `run` subcommand's flags)."""

    config_dir: str = "configs"
    runs_dir: str = "runs"
    results_dir: str = "results"
    steps: int | None = None
    posttrain_steps: int | None = None
    gpus: int | None = None  # devices per node
    nodes: int = 1
    extra: tuple[str, ...] = ()
