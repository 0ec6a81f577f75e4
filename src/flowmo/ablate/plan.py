"""A grid's cells as `flowmo fit` / `flowmo test` steps in dependency order (fits shared between cells once)."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from flowmo import pretrained
from flowmo.ablate.grid import Cell, Grid, Options, axis_of
from flowmo.ablate.overlays import overlay_files
from flowmo.errors import UserError


@dataclass(frozen=True)
class Step:
    key: str  # unique within the plan: "fit:<run>", "test:<cell>:s<seed>"
    action: str  # "fit" | "test"
    cell: str  # the cell this step serves first (fits are shared)
    seed: int  # the replicate: initialisation, data draw and training noise of the fits
    run_name: str
    argv: tuple[str, ...]  # the arguments after `flowmo`
    checkpoint: str  # written by a fit, read by a test
    needs: tuple[str, ...] = ()  # keys of the steps that must finish first

    def shell(self) -> str:
        return shlex.join(("flowmo", *self.argv))


def trained_name(grid: Grid, cell: Cell) -> str:
    """ablate-<grid>-<train values>: what every replicate of the cell's Stage-1A fit is named after."""
    names = [v.name for v in cell.of_kind(grid, "train") if v is not axis_of(grid, v).base]
    return f"ablate-{grid.name}-{'+'.join(names) or 'base'}"


def fit_run(grid: Grid, cell: Cell, seed: int) -> str:
    return f"{trained_name(grid, cell)}-s{seed}"


def posttrain_run(grid: Grid, cell: Cell, seed: int) -> str | None:
    values = cell.of_kind(grid, "posttrain")
    if not values or values[0] is axis_of(grid, values[0]).base:
        return None
    return f"{trained_name(grid, cell)}-{values[0].name}-s{seed}"


def test_run(grid: Grid, cell: Cell, seed: int) -> str:
    return f"ablate-{grid.name}-{cell.name}-s{seed}"


def test_key(cell: Cell, seed: int) -> str:
    return f"test:{cell.name}:s{seed}"


def checkpoint_of(run_name: str, options: Options) -> str:
    return f"{options.runs_dir}/{run_name}/checkpoints/last.ckpt"


def metrics_path(grid: Grid, cell: Cell, seed: int, options: Options) -> Path:
    return Path(options.results_dir) / test_run(grid, cell, seed) / "metrics.json"


def _seed_args(seed: int) -> list[str]:
    """A replicate's seed changes the initialisation, the data draw and the training noise; tests keep the eval
    stack's model.seed, so every replicate is evaluated with the same noise per image (differences pair by seed)."""
    return ["--seed_everything", str(seed), "--model.seed", str(seed), "--data.seed", str(seed)]


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
            raise UserError(
                f"global batch {total} is not a multiple of {per_device} per device x {world} devices; "
                "choose a device count that divides it, or set the batch with --extra."
            )
        args += [
            "--data.batch_size",
            str(per_device),
            "--trainer.accumulate_grad_batches",
            str(total // (per_device * world)),
        ]
    if world > 1:
        args += ["--trainer.strategy", "ddp_find_unused_parameters_true" if fit else "ddp"]
    return args


def _feature_metric_args(grid: Grid) -> list[str]:
    """feature_metrics: auto -> LPIPS (AlexNet / VGG) and rFID only where their pretrained files are cached."""
    if grid.feature_metrics != "auto":
        return []
    nets = list(pretrained.cached_lpips_nets())
    return [
        "--model.eval.lpips_nets",
        json.dumps(nets),
        "--model.eval.rfid",
        str(pretrained.is_available("inception_fid")).lower(),
    ]


def plan(grid: Grid, options: Options, cells: list[Cell] | None = None) -> list[Step]:
    """Steps in dependency order, seed by seed; a fit several cells share appears once per seed."""
    steps: dict[str, Step] = {}
    for seed in grid.seeds:
        for cell in cells or list(grid.cells):
            for value in cell.of_kind(grid, "train"):
                if value.init_from:  # e.g. Table 4's MSE-pretrained encoder: that cell's fit (same seed) first
                    _add_fit(grid, grid.cell(value.init_from), seed, options, steps)
            fit = _add_fit(grid, cell, seed, options, steps)
            if posttrain_run(grid, cell, seed):
                fit = _add_posttrain(grid, cell, fit, options, steps)
            _add_test(grid, cell, fit, options, steps)
    return list(steps.values())


def _add_fit(grid: Grid, cell: Cell, seed: int, options: Options, steps: dict[str, Step]) -> Step:
    run = fit_run(grid, cell, seed)
    key = f"fit:{run}"
    if key in steps:
        return steps[key]
    overlays = overlay_files(grid, cell.of_kind(grid, "train"), options)
    argv = [
        "fit",
        *_configs(_stack(grid.stack, options) + overlays),
        "--run_name",
        run,
        "--runs_dir",
        options.runs_dir,
        *_seed_args(seed),
    ]
    needs = []
    for value in cell.of_kind(grid, "train"):
        if value.init_from:
            source = fit_run(grid, grid.cell(value.init_from), seed)
            argv += ["--model.init.weights", checkpoint_of(source, options)]
            needs.append(f"fit:{source}")
    if options.steps or grid.steps:
        argv += ["--trainer.max_steps", str(options.steps or grid.steps)]
    argv += [*_device_args(options, True, grid.batch), *options.extra, "--ckpt_path", "last"]
    steps[key] = Step(key, "fit", cell.name, seed, run, tuple(argv), checkpoint_of(run, options), tuple(needs))
    return steps[key]


def _add_posttrain(grid: Grid, cell: Cell, stage_1a: Step, options: Options, steps: dict[str, Step]) -> Step:
    """Stage 1B of one replicate starts from the same replicate's Stage-1A EMA weights."""
    seed = stage_1a.seed
    run = posttrain_run(grid, cell, seed)
    key = f"fit:{run}"
    if key not in steps:
        overlays = overlay_files(grid, [*cell.of_kind(grid, "train"), *cell.of_kind(grid, "posttrain")], options)
        argv = [
            "fit",
            *_configs(_stack(grid.posttrain_stack, options) + overlays),
            "--run_name",
            run,
            "--runs_dir",
            options.runs_dir,
            *_seed_args(seed),
            "--model.init.weights",
            stage_1a.checkpoint,
            "--model.init.weights_from",
            "ema",
        ]
        if options.posttrain_steps or grid.posttrain_steps:
            argv += ["--trainer.max_steps", str(options.posttrain_steps or grid.posttrain_steps)]
        argv += [*_device_args(options, True, grid.posttrain_batch), *options.extra, "--ckpt_path", "last"]
        steps[key] = Step(key, "fit", cell.name, seed, run, tuple(argv), checkpoint_of(run, options), (stage_1a.key,))
    return steps[key]


def _add_test(grid: Grid, cell: Cell, fit: Step, options: Options, steps: dict[str, Step]) -> None:
    train = overlay_files(grid, cell.of_kind(grid, "train"), options)
    evaluation = overlay_files(grid, cell.of_kind(grid, "eval"), options)
    # the eval stack after the training overlays and before the eval-axis overlays: an eval value must win
    files = _stack(grid.stack, options) + train + _stack(grid.eval_stack, options) + evaluation
    run = test_run(grid, cell, fit.seed)
    argv = [
        "test",
        *_configs(files),
        "--run_name",
        run,
        "--runs_dir",
        options.runs_dir,
        "--model.init.weights",
        fit.checkpoint,
        "--model.init.weights_from",
        "ema",
        "--model.init.parts",
        "all",
        *_feature_metric_args(grid),
        *_device_args(options, False),
        *options.extra,
    ]
    key = test_key(cell, fit.seed)
    steps[key] = Step(key, "test", cell.name, fit.seed, run, tuple(argv), fit.checkpoint, (fit.key,))
