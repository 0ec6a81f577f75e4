"""A grid's results: each test's metrics.json read back into a table (Markdown, CSV) and bar charts."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import yaml

from flowmo.ablate.grid import Cell, Grid, Options, axis_of
from flowmo.ablate.plan import Step, fit_run, metrics_path, plan

METRICS = ("psnr", "ssim", "lpips", "rfid", "codebook")  # columns of the table; paper numbers where known
METRIC_KEYS = {"psnr": ("psnr_paper", "psnr"), "ssim": ("ssim_paper", "ssim"),
               "lpips": ("lpips_alex", "lpips_vgg", "lpips"), "rfid": ("rfid", "fid"),
               "codebook": ("codebook_used_fraction",)}
TITLES = {"psnr": "PSNR ↑ (dB)", "ssim": "SSIM ↑", "lpips": "LPIPS ↓", "rfid": "rFID ↓", "codebook": "codebook use ↑"}
DIGITS = {"psnr": 2, "ssim": 3, "lpips": 3, "rfid": 2, "codebook": 2}


def timings_path(grid: Grid, options: Options) -> Path:
    return Path(options.results_dir) / "ablations" / grid.name / "timings.json"


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
    timings_file = timings_path(grid, options)
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
    evaluated = [v for v in cell.of_kind(grid, "eval") if v is not axis_of(grid, v).base]
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
