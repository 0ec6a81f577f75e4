"""The paper's Stage-1A ablation grid (Table 4) and decoder-width scaling (C.3) as runnable cells (spec 7.1).

    flowmo ablate list                                   # every cell, what it changes, the paper's numbers
    flowmo ablate run --cells base,fsq --dry-run         # print the fit / test commands
    flowmo ablate run --cells table4 --gpus 8            # train + evaluate, then write the table
    flowmo ablate table                                  # results/ablations/table.{md,csv,png} from metrics.json

A cell is one YAML overlay, configs/ablations/<cell>.yaml, stacked on the ablation base:
    configs/base.yaml, model/small.yaml, stage/1a.yaml, data/imagenet.yaml, ablations/base.yaml, <cell>.yaml
Run names are `ablate-<cell>`: runs/ablate-<cell>/checkpoints, results/ablate-<cell>/metrics.json.
Evaluation-only cells (sampler_rho1, no_cfg) test the base checkpoint under their overlay; scale_w4 is the
base run itself. Tests load the EMA weights through `model.init_weights` rather than `--ckpt_path`, so no
hyper-parameter saved in a checkpoint can override an evaluation overlay: the configs alone decide.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

TRAIN_IMAGES, EPOCHS, GLOBAL_BATCH, DEVICE_BATCH = 1_281_167, 40, 128, 8
BASE_STEPS = math.ceil(TRAIN_IMAGES * EPOCHS / GLOBAL_BATCH)  # 400,365 optimizer steps = 40 epochs
STACK = ("base.yaml", "model/small.yaml", "stage/1a.yaml")  # under the config dir; the data config follows
METRICS = ("rfid", "psnr", "lpips")


@dataclass(frozen=True)
class Cell:
    """One ablation: its overlay is configs/ablations/<name>.yaml.

    eval_of: evaluation only, tests that cell's checkpoint. init_from: fits only after that cell (its
    checkpoint is passed as model.init_weights). same_as: identical to that cell's run (no commands).
    """

    name: str
    group: str
    label: str
    paper: dict[str, float]
    eval_of: str | None = None
    init_from: str | None = None
    same_as: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def run_name(self) -> str:
        return f"ablate-{self.same_as or self.name}"

    @property
    def trains(self) -> bool:
        return self.eval_of is None and self.same_as is None


def _paper(rfid: float, psnr: float, lpips: float) -> dict[str, float]:
    return {"rfid": rfid, "psnr": psnr, "lpips": lpips}


# Paper Table 4 (base: "fewer params" 517M, patch 8, 40 epochs) and the scaling table of C.3 (shorter runs).
CELLS: dict[str, Cell] = {c.name: c for c in (
    Cell("base", "table4", "base", _paper(2.87, 20.71, 0.15)),
    Cell("patch16", "table4", "2× patch size (16)", _paper(6.39, 19.94, 0.17)),
    Cell("mse_frozen_encoder", "table4", "MSE-pretrained encoder, then frozen", _paper(3.82, 21.40, 0.15),
         init_from="no_perceptual"),
    Cell("no_perceptual", "table4", "no perceptual loss", _paper(13.86, 22.11, 0.21)),
    Cell("fsq", "table4", "FSQ instead of LFQ", _paper(3.14, 21.31, 0.14)),
    Cell("logitnormal", "table4", "plain logit-normal t", _paper(4.08, 16.45, 0.21)),
    Cell("sampler_rho1", "table4", "unshifted sampler (ρ=1)", _paper(3.42, 20.25, 0.16), eval_of="base"),
    Cell("no_cfg", "table4", "no CFG", _paper(3.28, 20.67, 0.16), eval_of="base"),
    Cell("scale_w2", "scaling", "decoder width 384 (w=2)", _paper(7.77, 20.84, 0.169), extra={"params": "260M"}),
    Cell("scale_w3", "scaling", "decoder width 576 (w=3)", _paper(5.31, 21.28, 0.160), extra={"params": "367M"}),
    Cell("scale_w4", "scaling", "decoder width 768 (w=4)", _paper(4.45, 21.60, 0.155), same_as="base",
         extra={"params": "517M"}),
    Cell("scale_w5", "scaling", "decoder width 960 (w=5)", _paper(3.84, 21.70, 0.152), extra={"params": "710M"}),
)}
GROUPS = {"table4": [c for c in CELLS if CELLS[c].group == "table4"],
          "scaling": [c for c in CELLS if CELLS[c].group == "scaling"], "all": list(CELLS)}


def select(spec: str) -> list[str]:
    """'base,fsq' or group names ('table4', 'scaling', 'all') -> cell names in grid order."""
    chosen: set[str] = set()
    for token in filter(None, (t.strip() for t in spec.split(","))):
        if token not in CELLS and token not in GROUPS:
            raise ValueError(f"unknown ablation cell {token!r}; choose from {list(CELLS)} or {list(GROUPS)}.")
        chosen.update(GROUPS.get(token, [token]))
    return [name for name in CELLS if name in chosen]


# ------------------------------------------------------------------------------------------- commands
@dataclass(frozen=True)
class Options:
    """Where things live and what to add to every command (the `run` subcommand's flags)."""

    config_dir: str = "configs"
    data_config: str = "configs/data/imagenet.yaml"
    eval_config: str | None = "configs/eval/paper.yaml"
    runs_dir: str = "runs"
    results_dir: str = "results"
    steps: int | None = None
    gpus: int | None = None
    nodes: int = 1
    extra: tuple[str, ...] = ()


@dataclass(frozen=True)
class Step:
    cell: str
    action: str  # "fit" | "test"
    argv: tuple[str, ...]  # the arguments after `flowmo`
    checkpoint: str  # written by a fit, read by a test

    def shell(self) -> str:
        return shlex.join(("flowmo", *self.argv))


def checkpoint_of(run_name: str, options: Options) -> str:
    return f"{options.runs_dir}/{run_name}/checkpoints/last.ckpt"


def metrics_path(cell: Cell, results_dir: str) -> Path:
    return Path(results_dir) / cell.run_name / "metrics.json"


def _configs(cell: Cell, options: Options, evaluation: bool) -> list[str]:
    """-c stack: base, model, stage, data, ablation base, [eval protocol], the cell's overlay (wins last)."""
    root = Path(options.config_dir)
    files = [str(root / f) for f in STACK] + [options.data_config, str(root / "ablations" / "base.yaml")]
    if evaluation and options.eval_config:
        files.append(options.eval_config)  # before the overlay: the overlay's val_rho / val_cfg must win
    if cell.name != "base":  # ablations/base.yaml is already in the stack
        files.append(str(root / "ablations" / f"{cell.name}.yaml"))
    return [arg for f in files for arg in ("-c", f)]


def _device_args(options: Options, fit: bool) -> list[str]:
    """--gpus N [--nodes M]: devices, gradient accumulation that keeps the global batch at 128 (8 per device),
    and for fits across processes DDP that tolerates parameters without gradients (the encoder freezes)."""
    if options.gpus is None:
        return []
    world = options.gpus * options.nodes
    args = ["--trainer.devices", str(options.gpus), "--trainer.num_nodes", str(options.nodes)]
    if fit:
        if GLOBAL_BATCH % (DEVICE_BATCH * world):
            raise ValueError(f"global batch {GLOBAL_BATCH} is not a multiple of {DEVICE_BATCH} x {world} devices; "
                             "use 1, 2, 4, 8 or 16 devices in all, or set the batch yourself with --extra.")
        args += ["--trainer.accumulate_grad_batches", str(GLOBAL_BATCH // (DEVICE_BATCH * world))]
    if world > 1:
        args += ["--trainer.strategy", "ddp_find_unused_parameters_true" if fit else "ddp"]
    return args


def fit_step(cell: Cell, options: Options) -> Step:
    """Fit with `--ckpt_path last`: an interrupted or finished run resumes (or stops at once)."""
    ckpt = checkpoint_of(cell.run_name, options)
    argv = ["fit", *_configs(cell, options, False), "--run_name", cell.run_name, "--runs_dir", options.runs_dir]
    if cell.init_from:
        argv += ["--model.init_weights", checkpoint_of(CELLS[cell.init_from].run_name, options)]
    if options.steps is not None:
        argv += ["--trainer.max_steps", str(options.steps)]
    argv += [*_device_args(options, True), *options.extra, "--ckpt_path", "last"]
    return Step(cell.name, "fit", tuple(argv), ckpt)


def evaluation_step(cell: Cell, options: Options) -> Step:
    """Test the trained (or, for eval-only cells, the evaluated) run's EMA weights under this cell's overlay."""
    ckpt = checkpoint_of(CELLS[cell.eval_of or cell.name].run_name, options)
    argv = ["test", *_configs(cell, options, True), "--run_name", cell.run_name, "--runs_dir",
            options.runs_dir, "--model.init_weights", ckpt, "--model.init_weights_from", "ema",
            "--model.init_weights_parts", "all", *_device_args(options, False), *options.extra]
    return Step(cell.name, "test", tuple(argv), ckpt)


def plan(names: list[str], options: Options) -> list[Step]:
    """Steps in dependency order: a checkpoint a cell needs is trained first (resumed if it exists)."""
    steps: list[Step] = []

    def add(step: Step) -> None:
        if step not in steps:
            steps.append(step)

    for name in names:
        cell = CELLS[name]
        if cell.same_as:
            add(fit_step(CELLS[cell.same_as], options))
            add(evaluation_step(CELLS[cell.same_as], options))
            continue
        for needed in filter(None, (cell.eval_of, cell.init_from)):
            add(fit_step(CELLS[needed], options))
        if cell.trains:
            add(fit_step(cell, options))
        add(evaluation_step(cell, options))
    return steps


def _test_is_current(step: Step, options: Options) -> bool:
    """A test is skipped when its metrics.json is newer than the checkpoint it evaluated."""
    metrics, ckpt = metrics_path(CELLS[step.cell], options.results_dir), Path(step.checkpoint)
    return metrics.is_file() and ckpt.is_file() and metrics.stat().st_mtime >= ckpt.stat().st_mtime


def execute(steps: list[Step], options: Options, force: bool = False) -> None:
    for step in steps:
        if step.action == "test" and not force and _test_is_current(step, options):
            print(f"[ablate] {step.cell}: test skipped, results are newer than {step.checkpoint} (--force reruns)")
            continue
        print(f"[ablate] {step.cell} {step.action}: {step.shell()}", flush=True)
        # a fresh process per step: memory is freed between 517M runs, and Lightning's DDP launcher re-runs
        # this process's own command line on every rank, which must be the single fit / test
        done = subprocess.run([sys.executable, "-m", "flowmo", *step.argv], check=False)
        if done.returncode:
            raise SystemExit(f"[ablate] {step.cell} {step.action} failed (exit {done.returncode}); fix it and run "
                             "the same command again: finished fits resume, current tests are skipped.")


# ------------------------------------------------------------------------------------------- results
# Keys of results/<run>/metrics.json as flowmo.callbacks.report writes them ({"metrics": {...}, "num_images",
# "stand_ins"}), read defensively (a flat file or `test/` prefixes work too). PSNR: the paper-compatible pooled
# `psnr_paper` when present, else per-image `psnr`. LPIPS: AlexNet (the paper's magnitudes suggest it,
# spec 10), else VGG; the key used is recorded in the notes and the CSV.
METRIC_KEYS = {"rfid": ("rfid", "fid"), "psnr": ("psnr_paper", "psnr"), "lpips": ("lpips_alex", "lpips_vgg", "lpips")}
DIGITS = {"rfid": 2, "psnr": 2, "lpips": 3}


def _lookup(pools: list[dict], key: str) -> float | None:
    for pool in pools:
        for candidate in (key, f"test/{key}"):
            value = pool.get(candidate)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
    return None


def read_metrics(path: Path) -> dict | None:
    """{rfid, psnr, lpips (those found), <metric>_key, num_images, stand_ins}, or None without a file."""
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    pools = [report.get("metrics") or {}, report]
    found: dict = {"num_images": report.get("num_images"), "stand_ins": list(report.get("stand_ins") or [])}
    for metric, keys in METRIC_KEYS.items():
        key = next((k for k in keys if _lookup(pools, k) is not None), None)
        if key is not None:
            found[metric], found[f"{metric}_key"] = _lookup(pools, key), key
    return found


def _notes(cell: Cell, found: dict | None) -> list[str]:
    notes = []
    if cell.same_as:
        notes.append(f"= the {cell.same_as} run")
    if cell.eval_of:
        notes.append(f"evaluates the {cell.eval_of} checkpoint")
    if found is None:
        return notes + ["not run yet"]
    if found["stand_ins"]:
        notes.append(f"STAND-IN NETS ({', '.join(found['stand_ins'])}): numbers mean nothing")
    if found.get("num_images") not in (None, 50_000):
        notes.append(f"{found['num_images']} images (paper: 50k; rFID biased upward)")
    if found.get("psnr_key") == "psnr":
        notes.append("per-image PSNR (no psnr_paper)")
    if found.get("lpips_key") not in (None, "lpips_alex"):
        notes.append(f"LPIPS = {found['lpips_key']}")
    return notes


def collect(names: list[str], results_dir: str) -> list[dict]:
    """One row per cell: our numbers (None where missing), the paper's, the run and notes."""
    rows = []
    for name in names:
        cell = CELLS[name]
        found = read_metrics(metrics_path(cell, results_dir))
        row = {"cell": name, "group": cell.group, "variant": cell.label, "run": cell.run_name, **cell.extra}
        for metric in METRICS:
            row[metric] = (found or {}).get(metric)
            row[f"{metric}_paper"] = cell.paper[metric]
            row[f"{metric}_key"] = (found or {}).get(f"{metric}_key")
        row["num_images"] = (found or {}).get("num_images")
        row["notes"] = "; ".join(_notes(cell, found))
        rows.append(row)
    return rows


def _fmt(value: float | None, metric: str) -> str:
    return "–" if value is None else f"{value:.{DIGITS[metric]}f}"


def markdown_table(rows: list[dict], extra_column: str | None = None) -> str:
    head = ["cell", "variant"] + ([extra_column] if extra_column else [])
    head += ["rFID↓", "paper", "PSNR↑", "paper", "LPIPS↓", "paper", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["cell"], row["variant"]] + ([row.get(extra_column, "")] if extra_column else [])
        for metric in METRICS:
            cells += [_fmt(row[metric], metric), _fmt(row[f"{metric}_paper"], metric)]
        lines.append("| " + " | ".join(cells + [row["notes"]]) + " |")
    return "\n".join(lines) + "\n"


def report_markdown(rows: list[dict], plot_note: str) -> str:
    table4 = [r for r in rows if r["group"] == "table4"]
    scaling = [r for r in rows if r["group"] == "scaling"]
    parts = ["# FlowMo ablations: ours next to the paper (spec 7.1)\n",
             f"Base = \"fewer params\" (preset small, 517M, patch 8), Stage 1A, 40 epochs = {BASE_STEPS:,} steps at "
             "global batch 128, EMA weights, 25-step rho=4 sampler with interval CFG 1.5 unless the cell says "
             "otherwise. PSNR is the paper-compatible `psnr_paper`, LPIPS AlexNet, unless a note says otherwise.\n"]
    if table4:
        parts += ["## Table 4: Stage-1A design ablations\n", markdown_table(table4)]
    if scaling:
        parts += ["## Scaling: decoder width (paper C.3; encoder 768 and patch 8 fixed)\n",
                  "The paper's scaling runs were shorter than the Table-4 base (length not stated); ours train "
                  "as long as the base, so compare the trend, not the values.\n",
                  markdown_table(scaling, extra_column="params")]
    return "\n".join(parts + [plot_note]) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    columns = ["cell", "group", "variant", "run", "params"]
    columns += [f"{m}{suffix}" for m in METRICS for suffix in ("", "_paper", "_key")] + ["num_images", "notes"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_plot(rows: list[dict], path: Path) -> str:
    """Grouped bars, ours vs paper, one panel per metric; matplotlib is optional (not a dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "No plot: matplotlib is not installed (`pip install matplotlib`, then `flowmo ablate table`)."
    names = [r["cell"] for r in rows]
    figure, axes = plt.subplots(1, 3, figsize=(max(9.0, 1.8 * len(names)), 4), constrained_layout=True)
    for axis, metric in zip(axes, METRICS):
        xs = range(len(names))
        axis.bar([x - 0.2 for x in xs], [r[f"{metric}_paper"] for r in rows], 0.4, label="paper")
        ours = [r[metric] if r[metric] is not None else math.nan for r in rows]  # a missing run draws no bar
        axis.bar([x + 0.2 for x in xs], ours, 0.4, label="ours")
        axis.set_xticks(list(xs), names, rotation=60, ha="right", fontsize=8)
        axis.set_title({"rfid": "rFID ↓", "psnr": "PSNR ↑", "lpips": "LPIPS ↓"}[metric])
    axes[0].legend()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return f"![ours vs paper]({path.name})"


def write_results(names: list[str], results_dir: str, out_dir: str | None = None) -> dict[str, Path]:
    """results/ablations/table.md, table.csv and (with matplotlib) table.png."""
    out = Path(out_dir or Path(results_dir) / "ablations")
    out.mkdir(parents=True, exist_ok=True)
    rows = collect(names, results_dir)
    paths = {"md": out / "table.md", "csv": out / "table.csv", "png": out / "table.png"}
    plot_note = write_plot(rows, paths["png"])
    if not paths["png"].is_file():
        del paths["png"]
    write_csv(rows, paths["csv"])
    paths["md"].write_text(report_markdown(rows, plot_note))
    return paths


# ------------------------------------------------------------------------------------------- command line
def list_cells() -> str:
    lines = [f"{'cell':<20} {'group':<8} {'rFID/PSNR/LPIPS (paper)':<24} variant"]
    for cell in CELLS.values():
        paper = "/".join(_fmt(cell.paper[m], m) for m in METRICS)
        how = (f" [eval-only: {cell.eval_of} checkpoint]" if cell.eval_of else
               f" [after {cell.init_from}]" if cell.init_from else f" [= {cell.same_as} run]" if cell.same_as else "")
        lines.append(f"{cell.name:<20} {cell.group:<8} {paper:<24} {cell.label}{how}")
    return "\n".join(lines + [f"groups: {', '.join(GROUPS)}; base = {BASE_STEPS:,} steps (40 epochs at batch 128)"])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowmo ablate", description="the paper's Table-4 ablation grid")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the cells, what they change and the paper's numbers")
    run = sub.add_parser("run", help="fit + test the selected cells, then write the table")
    run.add_argument("--cells", default="table4", help="comma list of cells or groups (table4, scaling, all)")
    run.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    run.add_argument("--steps", type=int, help=f"trainer.max_steps of every fit (default {BASE_STEPS:,})")
    run.add_argument("--gpus", type=int, help="devices per node; accumulation keeps the global batch at 128")
    run.add_argument("--nodes", type=int, default=1)
    run.add_argument("--extra", action="append", default=[], help="arguments appended to every command, "
                     "e.g. --extra='--data.num_workers 4' (repeatable)")
    run.add_argument("--data-config", default="configs/data/imagenet.yaml")
    run.add_argument("--eval-config", default="configs/eval/paper.yaml", help="'' for none")
    run.add_argument("--force", action="store_true", help="rerun tests whose metrics.json is current")
    table = sub.add_parser("table", help="write results/ablations/table.{md,csv,png} from metrics.json files")
    table.add_argument("--cells", default="all")
    for sub_parser in (run, table):
        sub_parser.add_argument("--config-dir", default="configs")
        sub_parser.add_argument("--runs-dir", default="runs")
        sub_parser.add_argument("--results-dir", default="results",
                                help="where the tests' EvaluationReport writes (out_dir in configs/eval/paper.yaml)")
        sub_parser.add_argument("--out", help="table folder (default <results-dir>/ablations)")
    return parser


def options_from(args: argparse.Namespace) -> Options:
    extra = tuple(token for chunk in args.extra for token in shlex.split(chunk))
    return Options(config_dir=args.config_dir, data_config=args.data_config, eval_config=args.eval_config or None,
                   runs_dir=args.runs_dir, results_dir=args.results_dir, steps=args.steps, gpus=args.gpus,
                   nodes=args.nodes, extra=extra)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "list":
        print(list_cells())
        return 0
    names = select(args.cells)
    if args.command == "run":
        options = options_from(args)
        steps = plan(names, options)
        if args.dry_run:
            print("\n".join(f"# {s.cell} {s.action}\n{s.shell()}" for s in steps))
            return 0
        execute(steps, options, force=args.force)
        names = GROUPS["all"]  # the table always shows the whole grid: cells not run yet say so
    paths = write_results(names, args.results_dir, args.out)
    print("ablation table: " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
