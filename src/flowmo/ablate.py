"""Ablation grids as data: configs/ablations/<grid>.yaml -> fits, Stage-1B hand-offs, tests, a table.

    flowmo ablate grids                                  # the shipped grids and what each one asks
    flowmo ablate list tiny                              # its cells and their resolved overlays
    flowmo ablate run tiny --dry-run                     # every command, nothing runs
    flowmo ablate run tiny                               # train + evaluate here, then write the table
    flowmo ablate run paper-table4 --launcher slurm --nodes 2 --gpus-per-node 8 --partition gpu
    flowmo ablate table tiny                             # results/ablations/tiny/table.{md,csv} + <metric>.png

A grid file names the config stack of its base, its axes and how cells are formed (the file format is
documented in configs/ablations/README.md). Every axis value is a small config overlay, inline or a file.
An axis has a kind:
- train: the value changes what is trained, so each distinct combination of train values is one fit;
- eval: the value only changes evaluation (sampler rho, CFG, steps): the cell tests the checkpoint of the
  cell with the same train values instead of training again;
- posttrain: the first value means "Stage 1A only"; any other runs Stage 1B (the grid's posttrain stack plus
  the value's overlay) starting from the same cell's Stage-1A checkpoint (EMA weights), so "1A only" and
  "1A + 1B" are two rows of one grid.
Cells are `one-at-a-time` (the paper's style: the base, then each non-base value alone) or `product` (every
combination of the listed axes, the others at their base value).

Names: fits are runs/ablate-<grid>-<train values>[-<posttrain value>], tests runs/ablate-<grid>-<cell> and write
results/ablate-<grid>-<cell>/metrics.json. Fits resume (`--ckpt_path last`); tests whose metrics are newer than
their checkpoint are skipped; each step's wall time goes to results/ablations/<grid>/timings.json. Tests load
the EMA weights through `model.init_weights`, so the configs alone decide the evaluation protocol.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import difflib
import inspect
import itertools
import json
import math
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flowmo.errors import UserError

KINDS = ("train", "eval", "posttrain")
MODES = ("one-at-a-time", "product")
METRICS = ("psnr", "ssim", "lpips", "rfid", "codebook")  # columns of the table; paper numbers where known
METRIC_KEYS = {"psnr": ("psnr_paper", "psnr"), "ssim": ("ssim_paper", "ssim"),
               "lpips": ("lpips_alex", "lpips_vgg", "lpips"), "rfid": ("rfid", "fid"),
               "codebook": ("codebook_used_fraction",)}
TITLES = {"psnr": "PSNR ↑ (dB)", "ssim": "SSIM ↑", "lpips": "LPIPS ↓", "rfid": "rFID ↓", "codebook": "codebook use ↑"}
DIGITS = {"psnr": 2, "ssim": 3, "lpips": 3, "rfid": 2, "codebook": 2}
TOP_LEVEL_KEYS = ("trainer", "model", "data", "checkpoint", "seed_everything", "run_name", "runs_dir", "ckpt_path")


# ------------------------------------------------------------------------------------------- the grid file
@dataclass(frozen=True)
class Value:
    """One value of an axis: a config overlay (inline mapping, or a file under the config dir)."""

    axis: str
    name: str
    label: str
    overlay: Any  # dict (inline) | str (path relative to the config dir)
    init_from: str | None = None  # a cell whose Stage-1A checkpoint this fit starts from (model.init_weights)


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
    cells: tuple[Cell, ...] = field(default=())


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
    unknown = set(raw) - {"title", "description", "stack", "eval_stack", "posttrain", "steps", "axes", "cells",
                          "product_axes", "paper", "sample_set", "feature_metrics", "notes", "batch",
                          "per_image_metrics"}
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
    grid = Grid(name=path.stem, path=path, title=raw.get("title", path.stem), description=raw.get("description", ""),
                stack=tuple(_require(raw, "stack", list, where)), eval_stack=tuple(raw.get("eval_stack") or ()),
                posttrain_stack=tuple(posttrain.get("stack") or ()), steps=raw.get("steps"),
                posttrain_steps=posttrain.get("steps"), axes=axes, mode=mode, product_axes=product_axes,
                paper={str(k): dict(v) for k, v in (raw.get("paper") or {}).items()},
                batch=raw.get("batch"), posttrain_batch=posttrain.get("batch"), sample_set=raw.get("sample_set"),
                feature_metrics=raw.get("feature_metrics", "configured"),
                per_image_metrics=bool(raw.get("per_image_metrics", False)),
                notes=raw.get("notes", ""))
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
            raise UserError(f"{where}: a value of axis {entry['name']!r} is named {item['name']}, which YAML reads "
                            "from on/off/yes/no/true/false; quote it, e.g. name: 'on'.")
        overlay = item.get("overlay", {}) or {}
        if not isinstance(overlay, (dict, str)):
            raise UserError(f"{where}: value {item['name']!r}: overlay must be a mapping or a file path.")
        values.append(Value(entry["name"], str(item["name"]), item.get("label", str(item["name"])), overlay,
                            item.get("init_from")))
    if len({v.name for v in values}) != len(values):
        raise UserError(f"{where}: axis {entry['name']!r} lists a value name twice.")
    return Axis(entry["name"], kind, tuple(values))


def _cells(grid: Grid) -> list[Cell]:
    base = tuple(axis.base for axis in grid.axes)
    if grid.mode == "one-at-a-time":
        choices = [base] + [base[:i] + (value,) + base[i + 1:]
                            for i, axis in enumerate(grid.axes) for value in axis.values[1:]]
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


# ------------------------------------------------------------------------------------------- checking overlays
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
                raise UserError(f"{grid.path}: axis {axis.name!r} value {value.name!r} sets `{key}`, which is not a "
                                f"flowmo fit/test argument{hint}.")


def unknown_keys(overlay: dict) -> list[tuple[str, str]]:
    """(dotted key, ' (did you mean ...?)') for each key no flowmo component accepts."""
    known = _known_arguments()
    bad = []
    for dotted in _dotted(overlay):
        section = dotted.split(".")[0]
        if section not in TOP_LEVEL_KEYS:
            bad.append((dotted, _hint(section, TOP_LEVEL_KEYS)))
            continue
        names = known.get(section)
        parts = dotted.split(".")
        if names is None or len(parts) < 2:
            continue
        if section == "model" and parts[1] == "architecture" and len(parts) > 2:
            fields = known["architecture"] if len(parts) == 3 else known["transformer"]
            if parts[-1] not in fields:
                bad.append((dotted, _hint(parts[-1], fields)))
        elif parts[1] not in names:
            bad.append((dotted, _hint(parts[1], names)))
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
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from flowmo.config import FlowMoConfig, TransformerConfig
    from flowmo.data.datamodule import FlowMoDataModule
    from flowmo.module import FlowMoModule

    def arguments(target) -> tuple[str, ...]:
        return tuple(p for p in inspect.signature(target).parameters if p != "self")

    return {"model": arguments(FlowMoModule.__init__), "data": arguments(FlowMoDataModule.__init__),
            "trainer": arguments(L.Trainer.__init__), "checkpoint": arguments(ModelCheckpoint.__init__),
            "architecture": tuple(f.name for f in dataclasses.fields(FlowMoConfig)),
            "transformer": tuple(f.name for f in dataclasses.fields(TransformerConfig))}


# ------------------------------------------------------------------------------------------- commands
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


@dataclass(frozen=True)
class Step:
    key: str  # unique within the plan: "fit:<run>", "test:<cell>"
    action: str  # "fit" | "test"
    cell: str  # the cell this step serves first (fits are shared)
    run_name: str
    argv: tuple[str, ...]  # the arguments after `flowmo`
    checkpoint: str  # written by a fit, read by a test
    needs: tuple[str, ...] = ()  # keys of the steps that must finish first

    def shell(self) -> str:
        return shlex.join(("flowmo", *self.argv))


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


def fit_run(grid: Grid, cell: Cell) -> str:
    names = [v.name for v in cell.of_kind(grid, "train") if v is not _axis_of(grid, v).base]
    return f"ablate-{grid.name}-{'+'.join(names) or 'base'}"


def posttrain_run(grid: Grid, cell: Cell) -> str | None:
    values = cell.of_kind(grid, "posttrain")
    if not values or values[0] is _axis_of(grid, values[0]).base:
        return None
    return f"{fit_run(grid, cell)}-{values[0].name}"


def test_run(grid: Grid, cell: Cell) -> str:
    return f"ablate-{grid.name}-{cell.name}"


def _axis_of(grid: Grid, value: Value) -> Axis:
    return next(axis for axis in grid.axes if axis.name == value.axis)


def checkpoint_of(run_name: str, options: Options) -> str:
    return f"{options.runs_dir}/{run_name}/checkpoints/last.ckpt"


def metrics_path(grid: Grid, cell: Cell, options: Options) -> Path:
    return Path(options.results_dir) / test_run(grid, cell) / "metrics.json"


def _stack(files: tuple[str, ...] | list[str], options: Options) -> list[str]:
    return [str(Path(options.config_dir) / f) for f in files]


def _configs(files: list[str]) -> list[str]:
    return [arg for f in files for arg in ("-c", f)]


def _device_args(options: Options, fit: bool, batch: dict | None = None) -> list[str]:
    """--trainer.devices/num_nodes; for fits, gradient accumulation that keeps the grid's global batch
    (batch: {global, per_device}); across processes, DDP that tolerates the frozen encoder in fits."""
    if options.gpus is None:
        return []
    world = options.gpus * options.nodes
    args = ["--trainer.devices", str(options.gpus), "--trainer.num_nodes", str(options.nodes)]
    if fit and batch:
        total, per_device = int(batch["global"]), int(batch["per_device"])
        if total % (per_device * world):
            raise UserError(f"global batch {total} is not a multiple of {per_device} per device x {world} devices; "
                            "choose a device count that divides it, or set the batch with --extra.")
        args += ["--data.batch_size", str(per_device), "--trainer.accumulate_grad_batches",
                 str(total // (per_device * world))]
    if world > 1:
        args += ["--trainer.strategy", "ddp_find_unused_parameters_true" if fit else "ddp"]
    return args


def _feature_metric_args(grid: Grid) -> list[str]:
    """feature_metrics: auto -> LPIPS (AlexNet / VGG) and rFID only where their pretrained files are cached."""
    if grid.feature_metrics != "auto":
        return []
    from flowmo import pretrained
    from flowmo.demo import available_lpips

    nets = list(available_lpips())
    return ["--model.val_lpips_nets", json.dumps(nets), "--model.val_rfid",
            str(pretrained.is_available("inception_fid")).lower()]


def plan(grid: Grid, options: Options, cells: list[Cell] | None = None) -> list[Step]:
    """Steps in dependency order; a fit several cells share appears once."""
    steps: dict[str, Step] = {}
    by_name = {c.name: c for c in grid.cells}
    for cell in cells or list(grid.cells):
        for value in cell.of_kind(grid, "train"):
            if value.init_from:  # e.g. Table 4's MSE-pretrained encoder: that cell's fit first
                _add_fit(grid, by_name[value.init_from], options, steps)
        fit = _add_fit(grid, cell, options, steps)
        if posttrain_run(grid, cell):
            fit = _add_posttrain(grid, cell, fit, options, steps)
        _add_test(grid, cell, fit, options, steps)
    return list(steps.values())


def _add_fit(grid: Grid, cell: Cell, options: Options, steps: dict[str, Step]) -> Step:
    run = fit_run(grid, cell)
    key = f"fit:{run}"
    if key in steps:
        return steps[key]
    overlays = overlay_files(grid, cell.of_kind(grid, "train"), options)
    argv = ["fit", *_configs(_stack(grid.stack, options) + overlays), "--run_name", run, "--runs_dir", options.runs_dir]
    needs = []
    for value in cell.of_kind(grid, "train"):
        if value.init_from:
            source = fit_run(grid, next(c for c in grid.cells if c.name == value.init_from))
            argv += ["--model.init_weights", checkpoint_of(source, options)]
            needs.append(f"fit:{source}")
    if options.steps or grid.steps:
        argv += ["--trainer.max_steps", str(options.steps or grid.steps)]
    argv += [*_device_args(options, True, grid.batch), *options.extra, "--ckpt_path", "last"]
    steps[key] = Step(key, "fit", cell.name, run, tuple(argv), checkpoint_of(run, options), tuple(needs))
    return steps[key]


def _add_posttrain(grid: Grid, cell: Cell, stage_1a: Step, options: Options, steps: dict[str, Step]) -> Step:
    run = posttrain_run(grid, cell)
    key = f"fit:{run}"
    if key not in steps:
        overlays = overlay_files(grid, [*cell.of_kind(grid, "train"), *cell.of_kind(grid, "posttrain")], options)
        argv = ["fit", *_configs(_stack(grid.posttrain_stack, options) + overlays), "--run_name", run,
                "--runs_dir", options.runs_dir, "--model.init_weights", stage_1a.checkpoint,
                "--model.init_weights_from", "ema"]
        if options.posttrain_steps or grid.posttrain_steps:
            argv += ["--trainer.max_steps", str(options.posttrain_steps or grid.posttrain_steps)]
        argv += [*_device_args(options, True, grid.posttrain_batch), *options.extra, "--ckpt_path", "last"]
        steps[key] = Step(key, "fit", cell.name, run, tuple(argv), checkpoint_of(run, options), (stage_1a.key,))
    return steps[key]


def _add_test(grid: Grid, cell: Cell, fit: Step, options: Options, steps: dict[str, Step]) -> None:
    train = overlay_files(grid, cell.of_kind(grid, "train"), options)
    evaluation = overlay_files(grid, cell.of_kind(grid, "eval"), options)
    # the eval stack after the training overlays and before the eval-axis overlays: an eval value must win
    files = _stack(grid.stack, options) + train + _stack(grid.eval_stack, options) + evaluation
    run = test_run(grid, cell)
    argv = ["test", *_configs(files), "--run_name", run, "--runs_dir", options.runs_dir,
            "--model.init_weights", fit.checkpoint, "--model.init_weights_from", "ema",
            "--model.init_weights_parts", "all", *_feature_metric_args(grid), *_device_args(options, False),
            *options.extra]
    steps[f"test:{cell.name}"] = Step(f"test:{cell.name}", "test", cell.name, run, tuple(argv), fit.checkpoint,
                                      (fit.key,))


# ------------------------------------------------------------------------------------------- running here
def _timings_path(grid: Grid, options: Options) -> Path:
    return Path(options.results_dir) / "ablations" / grid.name / "timings.json"


def _test_is_current(grid: Grid, step: Step, options: Options) -> bool:
    cell = next(c for c in grid.cells if c.name == step.cell)
    metrics, ckpt = metrics_path(grid, cell, options), Path(step.checkpoint)
    return metrics.is_file() and ckpt.is_file() and metrics.stat().st_mtime >= ckpt.stat().st_mtime


def execute(grid: Grid, steps: list[Step], options: Options, force: bool = False) -> None:
    """Run every step in a fresh `python -m flowmo` process (memory freed between runs; Lightning's DDP
    launcher re-runs the process's own command line on every rank, which must be the single fit or test)."""
    timings_file = _timings_path(grid, options)
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    for step in steps:
        if step.action == "test" and not force and _test_is_current(grid, step, options):
            print(f"[ablate] {step.key}: skipped, its metrics are newer than {step.checkpoint} (--force reruns)")
            continue
        print(f"[ablate] {step.key}: {step.shell()}", flush=True)
        started = time.time()
        done = subprocess.run([sys.executable, "-m", "flowmo", *step.argv], check=False)
        if done.returncode:
            raise SystemExit(f"[ablate] {step.key} failed (exit {done.returncode}); fix it and run the same command "
                             "again: finished fits resume, current tests are skipped.")
        seconds = round(time.time() - started, 1)
        entry = timings.get(step.key, {})
        # a resumed fit adds to the time already spent; a fit that found itself finished adds ~nothing
        timings[step.key] = {"seconds": round(entry.get("seconds", 0.0) + seconds, 1) if step.action == "fit"
                             else seconds, "run": step.run_name}
        timings_file.parent.mkdir(parents=True, exist_ok=True)
        timings_file.write_text(json.dumps(timings, indent=1) + "\n")
        if step.action == "test":
            cell = next(c for c in grid.cells if c.name == step.cell)
            log_hparams(grid, cell, options)


def log_hparams(grid: Grid, cell: Cell, options: Options) -> Path | None:
    """The cell's axis values and final metrics in TensorBoard's HParams tab (runs/<test run>/hparams)."""
    found = read_metrics(metrics_path(grid, cell, options), grid.per_image_metrics)
    if found is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    folder = Path(options.runs_dir) / test_run(grid, cell) / "hparams"
    hparams = {"grid": grid.name, "cell": cell.name, **{v.axis: v.name for v in cell.choice}}
    metrics = {f"hparam/{m}": found[m] for m in METRICS if found.get(m) is not None}
    with SummaryWriter(str(folder)) as writer:
        writer.add_hparams(hparams, metrics, run_name=".")
    return folder


# ------------------------------------------------------------------------------------------- SLURM
@dataclass(frozen=True)
class Slurm:
    partition: str | None = None
    time: str | None = None
    gpus_per_node: int = 8
    nodes: int = 1
    cpus_per_task: int | None = None
    account: str | None = None
    python: str = sys.executable


def write_slurm(grid: Grid, steps: list[Step], options: Options, slurm: Slurm) -> Path:
    """One sbatch script per step under results/ablations/<grid>/slurm/ and submit.sh, which submits them in
    order with --dependency=afterok on the steps each needs. Fits run with --ckpt_path last, so a requeued or
    resubmitted job resumes; --signal=SIGUSR1@90 lets Lightning save and requeue before the time limit."""
    folder = Path(options.results_dir) / "ablations" / grid.name / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    submit = ["#!/bin/bash", f"# Submits the {grid.name} grid: {len(steps)} jobs, dependent ones chained.",
              "set -euo pipefail", f'cd "$(dirname "$0")"']
    variables: dict[str, str] = {}
    for index, step in enumerate(steps):
        script = folder / f"{index:03d}-{step.action}-{step.run_name}.sbatch"
        script.write_text(_sbatch(step, slurm, folder))
        variable = f"job_{index:03d}"
        variables[step.key] = variable
        after = ":".join(f"${variables[need]}" for need in step.needs if need in variables)
        dependency = f" --dependency=afterok:{after}" if after else ""
        submit.append(f"{variable}=$(sbatch --parsable{dependency} {script.name})")
        submit.append(f'echo "{step.key} -> ${variable}"')
    path = folder / "submit.sh"
    path.write_text("\n".join(submit) + "\n")
    path.chmod(0o755)
    return path


def _sbatch(step: Step, slurm: Slurm, folder: Path) -> str:
    lines = ["#!/bin/bash", f"#SBATCH --job-name={step.run_name}-{step.action}", f"#SBATCH --nodes={slurm.nodes}",
             f"#SBATCH --ntasks-per-node={slurm.gpus_per_node}", f"#SBATCH --gpus-per-node={slurm.gpus_per_node}",
             f"#SBATCH --output={folder.resolve()}/%x-%j.out"]
    lines += [f"#SBATCH --partition={slurm.partition}"] if slurm.partition else []
    lines += [f"#SBATCH --time={slurm.time}"] if slurm.time else []
    lines += [f"#SBATCH --account={slurm.account}"] if slurm.account else []
    lines += [f"#SBATCH --cpus-per-task={slurm.cpus_per_task}"] if slurm.cpus_per_task else []
    if step.action == "fit":
        lines += ["#SBATCH --signal=SIGUSR1@90", "#SBATCH --requeue"]
    lines += ["", f"cd {shlex.quote(str(Path.cwd()))}",
              "# one task per GPU; Lightning reads the SLURM environment (ranks, nodes, requeue on SIGUSR1)",
              "srun " + shlex.join((slurm.python, "-m", "flowmo", *step.argv))]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- results
def _lookup(pools: list[dict], key: str) -> float | None:
    for pool in pools:
        for candidate in (key, f"test/{key}"):
            value = pool.get(candidate)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
    return None


def read_metrics(path: Path, per_image: bool = False) -> dict | None:
    """{metric: value, <metric>_key, num_images, stand_ins, bits_per_pixel} from a test's metrics.json.
    per_image: PSNR / SSIM per image first (the paper's pooled variants are for comparing with the paper)."""
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    pools = [report.get("metrics") or {}, report]
    found: dict = {"num_images": report.get("num_images"), "stand_ins": list(report.get("stand_ins") or []),
                   "bits_per_pixel": report.get("bits_per_pixel")}
    preferences = dict(METRIC_KEYS)
    if per_image:
        preferences.update(psnr=("psnr", "psnr_paper"), ssim=("ssim", "ssim_paper"))
    for metric, keys in preferences.items():
        key = next((k for k in keys if _lookup(pools, k) is not None), None)
        if key is not None:
            found[metric], found[f"{metric}_key"] = _lookup(pools, key), key
    return found


def collect(grid: Grid, options: Options) -> list[dict]:
    """One row per cell: our numbers (None where missing), the paper's, steps, wall time and notes."""
    timings_file = _timings_path(grid, options)
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    steps = {s.key: s for s in plan(grid, options)}
    rows = []
    for cell in grid.cells:
        found = read_metrics(metrics_path(grid, cell, options), grid.per_image_metrics)
        row: dict[str, Any] = {"cell": cell.name, "changes": ", ".join(f"{v.axis}: {v.label}" for v in
                                                                        cell.changes(grid)) or "base"}
        for metric in METRICS:
            row[metric] = (found or {}).get(metric)
            row[f"{metric}_paper"] = cell.paper.get(metric)
            row[f"{metric}_key"] = (found or {}).get(f"{metric}_key")
        row["bits_per_pixel"] = (found or {}).get("bits_per_pixel")
        chain = _chain(steps, f"test:{cell.name}")
        fits = [s for s in chain if s.action == "fit"]
        row["steps"] = "+".join(str(_max_steps(s)) for s in fits) or None
        spent = [timings.get(s.key, {}).get("seconds") for s in chain]
        row["wall_min"] = round(sum(spent) / 60, 1) if spent and None not in spent else None
        row["notes"] = "; ".join(_notes(grid, cell, found))
        rows.append(row)
    return rows


def _chain(steps: dict[str, Step], key: str) -> list[Step]:
    """The step and every step it needs, first needed first."""
    step = steps[key]
    chain: list[Step] = []
    for need in step.needs:
        chain += [s for s in _chain(steps, need) if s not in chain]
    return chain + [step]


def _max_steps(step: Step) -> str:
    """trainer.max_steps as the fit will see it: the last -c file that sets it, unless the command line does."""
    argv = list(step.argv)
    if "--trainer.max_steps" in argv:
        return argv[argv.index("--trainer.max_steps") + 1]
    steps = "?"
    for flag, value in zip(argv, argv[1:]):
        if flag == "-c" and Path(value).is_file():
            trainer = (yaml.safe_load(Path(value).read_text()) or {}).get("trainer") or {}
            steps = str(trainer.get("max_steps", steps))
    return steps


def _notes(grid: Grid, cell: Cell, found: dict | None) -> list[str]:
    notes = []
    evaluated = [v for v in cell.of_kind(grid, "eval") if v is not _axis_of(grid, v).base]
    if evaluated:
        notes.append("evaluation only: tests the checkpoint of " + fit_run(grid, cell).removeprefix("ablate-"))
    if found is None:
        return notes + ["not run yet"]
    if found["stand_ins"]:
        notes.append(f"STAND-IN NETS ({', '.join(found['stand_ins'])}): numbers mean nothing")
    if found.get("psnr_key") == "psnr" and not grid.per_image_metrics:
        notes.append("per-image PSNR")
    if found.get("lpips_key") not in (None, "lpips_alex"):
        notes.append(f"LPIPS = {found['lpips_key']}")
    return notes


def _fmt(value, metric: str) -> str:
    return "–" if value is None else f"{value:.{DIGITS[metric]}f}"


def shown_metrics(rows: list[dict]) -> list[str]:
    """Metrics with at least one number (ours or the paper's)."""
    return [m for m in METRICS if any(r[m] is not None or r[f"{m}_paper"] is not None for r in rows)]


def markdown_table(rows: list[dict]) -> str:
    metrics = shown_metrics(rows)
    head = ["cell", "changes"]
    for metric in metrics:
        head += [TITLES[metric]] + (["paper"] if any(r[f"{metric}_paper"] is not None for r in rows) else [])
    head += ["bits/px", "steps", "wall (min)", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["cell"], row["changes"]]
        for metric in metrics:
            cells.append(_fmt(row[metric], metric))
            if any(r[f"{metric}_paper"] is not None for r in rows):
                cells.append(_fmt(row[f"{metric}_paper"], metric))
        bpp = row["bits_per_pixel"]
        bpp = "–" if bpp is None else "continuous" if math.isinf(bpp) else f"{bpp:.3f}"
        wall = "–" if row["wall_min"] is None else f"{row['wall_min']:.1f}"
        cells += [bpp, row["steps"] or "–", wall, row["notes"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    columns = ["cell", "changes"] + [f"{m}{s}" for m in METRICS for s in ("", "_paper", "_key")]
    columns += ["bits_per_pixel", "steps", "wall_min", "notes"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_plots(rows: list[dict], folder: Path) -> list[Path]:
    """One bar chart per metric: ours per cell (the paper's beside it where known), the base as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    names = [r["cell"] for r in rows]
    for metric in shown_metrics(rows):
        ours = [r[metric] if r[metric] is not None else math.nan for r in rows]  # a missing run draws no bar
        paper = [r[f"{metric}_paper"] if r[f"{metric}_paper"] is not None else math.nan for r in rows]
        has_paper = any(not math.isnan(p) for p in paper)
        figure, axis = plt.subplots(figsize=(max(5.0, 0.9 * len(names) + 2), 3.6), constrained_layout=True)
        xs = list(range(len(names)))
        width = 0.4 if has_paper else 0.7
        axis.bar([x + (0.2 if has_paper else 0) for x in xs], ours, width, label="ours", color="tab:blue")
        if has_paper:
            axis.bar([x - 0.2 for x in xs], paper, width, label="paper", color="tab:gray")
            axis.legend()
        if not math.isnan(ours[0]):
            axis.axhline(ours[0], color="tab:blue", linestyle=":", linewidth=1)
        finite = [v for v in ours + paper if not math.isnan(v)]
        if finite and metric in ("psnr", "rfid"):  # zoom: differences of a few tenths must show
            low, high = min(finite), max(finite)
            axis.set_ylim(max(0.0, low - 0.15 * (high - low + 1)), high + 0.15 * (high - low + 1))
        for x, value in zip(xs, ours):
            if not math.isnan(value):
                axis.annotate(f"{value:.{DIGITS[metric]}f}", (x + (0.2 if has_paper else 0), value),
                              ha="center", va="bottom", fontsize=7)
        axis.set_xticks(xs, names, rotation=35, ha="right", fontsize=8)
        axis.set_title(TITLES[metric])
        path = folder / f"{metric}.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        paths.append(path)
    return paths


def report_markdown(grid: Grid, rows: list[dict], plots: list[Path]) -> str:
    parts = [f"# Ablation grid `{grid.name}`: {grid.title}\n", grid.description.strip() + "\n" if grid.description else "",
             f"Cells: {grid.mode} over {', '.join(f'{a.name} ({a.kind})' for a in grid.axes)}. "
             + ("PSNR and SSIM are per image (averaged over images). " if grid.per_image_metrics else "")
             + "wall (min) = every step the cell needed (shared fits counted in each cell that uses them).\n",
             markdown_table(rows)]
    if grid.notes:
        parts.append(grid.notes.strip() + "\n")
    parts += [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(parts) + "\n"


def write_results(grid: Grid, options: Options) -> dict[str, Path]:
    """results/ablations/<grid>/table.md, table.csv and one <metric>.png per metric."""
    out = Path(options.results_dir) / "ablations" / grid.name
    out.mkdir(parents=True, exist_ok=True)
    rows = collect(grid, options)
    plots = write_plots(rows, out)
    paths = {"md": out / "table.md", "csv": out / "table.csv", **{p.stem: p for p in plots}}
    write_csv(rows, paths["csv"])
    paths["md"].write_text(report_markdown(grid, rows, plots))
    return paths


# ------------------------------------------------------------------------------------------- command line
def describe(grid: Grid, options: Options) -> str:
    lines = [f"{grid.name}: {grid.title}", f"  file {grid.path}; stack: {', '.join(grid.stack)}",
             f"  cells: {grid.mode}; axes: " + "; ".join(f"{a.name} [{a.kind}] = {', '.join(v.name for v in a.values)}"
                                                          for a in grid.axes)]
    for cell in grid.cells:
        paper = ", ".join(f"{k} {v}" for k, v in cell.paper.items())
        lines.append(f"- {cell.name}" + (f"   (paper: {paper})" if paper else ""))
        for value in cell.changes(grid):
            overlay = value.overlay if isinstance(value.overlay, str) else json.dumps(value.overlay)
            lines.append(f"    {value.axis} = {value.name} [{_axis_of(grid, value).kind}]: {overlay}")
    return "\n".join(lines)


def build_sample_set(grid: Grid) -> None:
    """Tiny grids train on the demo's sample shards: build them (once) with the grid's settings."""
    if not grid.sample_set:
        return
    from flowmo.demo import ensure_sample_data

    settings = grid.sample_set
    ensure_sample_data(Path(settings.get("out", "data/demo")), int(settings.get("size", 32)),
                       int(settings.get("train_crops", 600)), int(settings.get("val_crops", 16)),
                       float(settings.get("tint_grey", -1.0)))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowmo ablate", description="ablation grids (configs/ablations/*.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)
    grids = sub.add_parser("grids", help="the grids in configs/ablations/")
    grids.add_argument("--config-dir", default="configs")
    listing = sub.add_parser("list", help="a grid's cells and their resolved overlays")
    run = sub.add_parser("run", help="fit + test a grid's cells, then write its table")
    table = sub.add_parser("table", help="write results/ablations/<grid>/table.{md,csv} and the PNGs")
    for sub_parser in (listing, run, table):
        sub_parser.add_argument("grid", help="a grid name (flowmo ablate grids) or a grid .yaml path")
    listing.add_argument("--dry-run", action="store_true", help="also print every command")
    run.add_argument("--cells", help="comma list of cell names (default: every cell)")
    run.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    run.add_argument("--steps", type=int, help="trainer.max_steps of every Stage-1A fit (default: the grid's)")
    run.add_argument("--posttrain-steps", type=int, help="trainer.max_steps of every Stage-1B fit")
    run.add_argument("--gpus", type=int, help="devices per node for every command")
    run.add_argument("--nodes", type=int, default=1)
    run.add_argument("--extra", action="append", default=[], help="arguments appended to every command, "
                     "e.g. --extra='--data.num_workers 4' (repeatable)")
    run.add_argument("--force", action="store_true", help="rerun tests whose metrics.json is current")
    run.add_argument("--max-cells", type=int, default=16, help="refuse larger grids unless --yes (default 16)")
    run.add_argument("--yes", action="store_true", help="run a grid larger than --max-cells")
    run.add_argument("--launcher", choices=("local", "slurm"), default="local")
    slurm = run.add_argument_group("slurm (with --launcher slurm)")
    slurm.add_argument("--partition")
    slurm.add_argument("--time", help="per job, e.g. 48:00:00")
    slurm.add_argument("--account")
    slurm.add_argument("--gpus-per-node", type=int, default=8)
    slurm.add_argument("--cpus-per-task", type=int)
    for sub_parser in (listing, run, table):
        sub_parser.add_argument("--config-dir", default="configs")
        sub_parser.add_argument("--runs-dir", default="runs")
        sub_parser.add_argument("--results-dir", default="results",
                                help="where tests write metrics.json (the eval configs' out_dir)")
    return parser


def options_from(args: argparse.Namespace) -> Options:
    extra = tuple(token for chunk in getattr(args, "extra", []) for token in shlex.split(chunk))
    gpus = getattr(args, "gpus", None)
    if getattr(args, "launcher", "local") == "slurm":
        gpus = args.gpus_per_node
    return Options(config_dir=args.config_dir, runs_dir=args.runs_dir, results_dir=args.results_dir,
                   steps=getattr(args, "steps", None), posttrain_steps=getattr(args, "posttrain_steps", None),
                   gpus=gpus, nodes=getattr(args, "nodes", 1), extra=extra)


def selected_cells(grid: Grid, spec: str | None) -> list[Cell]:
    if not spec:
        return list(grid.cells)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in {c.name for c in grid.cells}]
    if unknown:
        raise UserError(f"grid {grid.name} has no cell {unknown[0]!r}; `flowmo ablate list {grid.name}` shows them.")
    return [c for c in grid.cells if c.name in names]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _main(args)
    except UserError as error:
        print(f"flowmo ablate: {error}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    if args.command == "grids":
        for name in available_grids(args.config_dir):
            print(f"{name:16} {load_grid(name, args.config_dir).title}")
        return 0
    grid = load_grid(args.grid, args.config_dir)
    options = options_from(args)
    if args.command == "list":
        print(describe(grid, options))
        if args.dry_run:
            print("\n".join(f"# {s.key}\n{s.shell()}" for s in plan(grid, options)))
        return 0
    if args.command == "table":
        paths = write_results(grid, options)
        print(f"ablation table {grid.name}: " + ", ".join(str(p) for p in paths.values()))
        return 0
    cells = selected_cells(grid, args.cells)
    if len(cells) > args.max_cells and not args.yes:
        raise UserError(f"grid {grid.name} has {len(cells)} cells, more than --max-cells {args.max_cells}; "
                        "pass --yes to run them all, or --cells to pick some.")
    check_overlays(grid, args.config_dir)
    write_inline_overlays(grid, options)
    steps = plan(grid, options, cells)
    if args.launcher == "slurm":
        slurm = Slurm(partition=args.partition, time=args.time, gpus_per_node=args.gpus_per_node, nodes=args.nodes,
                      cpus_per_task=args.cpus_per_task, account=args.account)
        submit = write_slurm(grid, steps, options, slurm)
        if args.dry_run:
            print(f"wrote {len(steps)} sbatch scripts and {submit}; run it to submit.")
        else:
            subprocess.run(["bash", str(submit)], check=True)
        return 0
    if args.dry_run:
        print("\n".join(f"# {s.key}\n{s.shell()}" for s in steps))
        return 0
    build_sample_set(grid)
    started = time.time()
    execute(grid, steps, options, force=args.force)
    paths = write_results(grid, options)
    print(f"ablation grid {grid.name}: {len(steps)} steps in {(time.time() - started) / 60:.1f} min; "
          + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
