"""A grid's table: results/ablations/<grid>/table.md (means ± 95% intervals, paired Δ from the base, reference
rows), table.csv (every replicate's raw values), summary.csv (the statistics) and one bar chart per metric with
error bars and each replicate as a dot."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from flowmo.ablate.grid import Grid, Options
from flowmo.ablate.results import DIGITS, METRICS, TITLES, Row, collect
from flowmo.ablate.stats import Estimate

SUPPORTED = "✱"  # marks a Δ whose paired 95% interval excludes 0
REFERENCE_COLOURS = ("dimgray", "tab:green", "tab:orange", "tab:purple")


def shown_metrics(rows: list[Row]) -> list[str]:
    """Metrics with at least one number (ours or the paper's)."""
    return [m for m in METRICS if any(r.estimates[m].mean is not None or r.paper[m] is not None for r in rows)]


def _fmt(value: float | None, metric: str) -> str:
    return "–" if value is None else f"{value:.{DIGITS[metric]}f}"


def _delta(estimate: Estimate | None, metric: str) -> str:
    return "–" if estimate is None else estimate.format(DIGITS[metric], signed=True, mark=SUPPORTED)


def _bits(bpp: float | None) -> str:
    return "–" if bpp is None else "continuous" if math.isinf(bpp) else f"{bpp:.3f}"


def markdown_table(rows: list[Row]) -> str:
    metrics = shown_metrics(rows)
    with_paper = [m for m in metrics if any(r.paper[m] is not None for r in rows)]
    head = ["cell", "changes"]
    for metric in metrics:
        head += [TITLES[metric], f"Δ {metric.upper() if metric in ('psnr', 'ssim') else metric}"]
        head += ["paper"] if metric in with_paper else []
    head += ["bits/px", "steps", "wall (min)", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row.cell, row.changes]
        for metric in metrics:
            estimate = row.estimates[metric]
            not_measured = estimate.n + estimate.missing == 0  # e.g. codebook use of a code without token ids
            shown = "–" if not_measured else estimate.format(DIGITS[metric])
            cells += [shown, _delta(row.deltas[metric], metric)]
            cells += [_fmt(row.paper[metric], metric)] if metric in with_paper else []
        wall = "–" if row.wall_min is None else f"{row.wall_min:.1f}"
        cells += [_bits(row.bits_per_pixel), row.steps or "–", wall, row.notes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def statistics_note(grid: Grid) -> str:
    """The table's header: what its numbers are, or why it gives no interval."""
    seeds = ", ".join(map(str, grid.seeds))
    if len(grid.seeds) == 1:
        return (
            f"One seed per cell (seed {seeds}): no interval can be given, and a difference between two cells "
            "is a single draw, not evidence. Give the grid `seeds: [0, 1, 2]` to measure run-to-run spread.\n"
        )
    return (
        f"Each number is the mean over {len(grid.seeds)} seeds ({seeds}; a seed changes the initialisation, the "
        "data draw and the training noise) ± the half-width of its 95% Student-t interval over seeds. "
        "Δ is the cell minus the base, paired by seed (every replicate is evaluated with the same noise per "
        f"image), with its 95% interval; {SUPPORTED} marks a Δ whose interval excludes 0. A replicate that "
        "failed or has not run is missing (shown as k of n), never averaged as if present. Reference rows "
        "train nothing: the same held-out images through a trivial codec, each at its bits per pixel.\n"
    )


def write_csv(grid: Grid, rows: list[Row], path: Path) -> None:
    """Every replicate's raw values: one line per cell and seed (reference rows: one line, no seed)."""
    columns = [
        "cell",
        "changes",
        "seed",
        *METRICS,
        *(f"{m}_key" for m in METRICS),
        "bits_per_pixel",
        "steps",
        "wall_min",
        "notes",
    ]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            for seed in row.seeds[:1] if row.reference else row.seeds:
                writer.writerow(
                    {
                        "cell": row.cell,
                        "changes": row.changes,
                        "seed": "" if row.reference else seed,
                        **{m: row.values[m].get(seed) for m in METRICS},
                        **{f"{m}_key": row.keys[m] for m in METRICS},
                        "bits_per_pixel": row.bits_per_pixel,
                        "steps": row.steps,
                        "wall_min": row.wall_min,
                        "notes": row.notes,
                    }
                )


def write_summary_csv(rows: list[Row], path: Path) -> None:
    """The statistics of table.md as numbers: mean, interval half-width, n, missing, paired Δ and its interval."""
    columns = ["cell", "changes", "reference"]
    for m in METRICS:
        columns += [
            f"{m}_mean",
            f"{m}_ci95",
            f"{m}_n",
            f"{m}_missing",
            f"{m}_delta",
            f"{m}_delta_ci95",
            f"{m}_delta_excludes_0",
            f"{m}_paper",
        ]
    columns += ["bits_per_pixel"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            line = {
                "cell": row.cell,
                "changes": row.changes,
                "reference": row.reference,
                "bits_per_pixel": row.bits_per_pixel,
            }
            for m in METRICS:
                estimate, delta = row.estimates[m], row.deltas[m]
                line.update(
                    {
                        f"{m}_mean": estimate.mean,
                        f"{m}_ci95": estimate.half_width,
                        f"{m}_n": estimate.n,
                        f"{m}_missing": estimate.missing,
                        f"{m}_paper": row.paper[m],
                        f"{m}_delta": delta.mean if delta else None,
                        f"{m}_delta_ci95": delta.half_width if delta else None,
                        f"{m}_delta_excludes_0": delta.excludes_zero if delta else None,
                    }
                )
            writer.writerow(line)


def write_plots(rows: list[Row], folder: Path) -> list[Path]:
    """One bar chart per metric: the mean per cell with its 95% interval, each replicate as a dot, the paper's
    bar beside it where known, the base as a dotted line and the reference codecs as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [r for r in rows if not r.reference]
    references = [r for r in rows if r.reference]
    paths = []
    for metric in shown_metrics(rows):
        means = [r.estimates[metric].mean for r in cells]
        ours = [math.nan if m is None else m for m in means]  # a missing cell draws no bar
        errors = [r.estimates[metric].half_width or 0.0 for r in cells]
        paper = [math.nan if r.paper[metric] is None else r.paper[metric] for r in cells]
        has_paper = any(not math.isnan(p) for p in paper)
        figure, axis = plt.subplots(figsize=(max(5.0, 0.9 * len(cells) + 3), 3.8), constrained_layout=True)
        xs = list(range(len(cells)))
        shift, width = (0.2, 0.4) if has_paper else (0.0, 0.7)
        axis.bar(
            [x + shift for x in xs],
            ours,
            width,
            yerr=errors,
            capsize=4,
            label="ours (mean, 95% interval)",
            color="tab:blue",
            alpha=0.8,
            error_kw={"linewidth": 1.2},
        )
        for x, row in zip(xs, cells):
            dots = [v for v in row.values[metric].values() if v is not None]
            axis.plot([x + shift] * len(dots), dots, "k.", markersize=4)
        if has_paper:
            axis.bar([x - 0.2 for x in xs], paper, width, label="paper", color="tab:gray")
        if not math.isnan(ours[0]):
            axis.axhline(ours[0], color="tab:blue", linestyle=":", linewidth=1)
        for index, row in enumerate(references):
            value = row.estimates[metric].mean
            if value is not None:
                axis.axhline(
                    value,
                    color=REFERENCE_COLOURS[index % len(REFERENCE_COLOURS)],
                    linestyle="--",
                    linewidth=1.2,
                    label=f"{row.cell} ({_bits(row.bits_per_pixel)} bits/px)",
                )
        finite = [
            v for v in ours + paper + [r.estimates[metric].mean or math.nan for r in references] if not math.isnan(v)
        ]
        if finite and metric in ("psnr", "rfid"):  # zoom: differences of a few tenths must show
            low, high = min(finite), max(finite)
            axis.set_ylim(max(0.0, low - 0.15 * (high - low + 1)), high + 0.15 * (high - low + 1))
        axis.set_xticks(xs, [r.cell for r in cells], rotation=35, ha="right", fontsize=8)
        axis.set_title(TITLES[metric])
        axis.legend(fontsize=7, loc="best")
        path = folder / f"{metric}.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        paths.append(path)
    return paths


def report_markdown(grid: Grid, rows: list[Row], plots: list[Path]) -> str:
    parts = [
        f"# Ablation grid `{grid.name}`: {grid.title}\n",
        grid.description.strip() + "\n" if grid.description else "",
        statistics_note(grid),
        f"Cells: {grid.mode} over {', '.join(f'{a.name} ({a.kind})' for a in grid.axes)}. "
        + ("PSNR and SSIM are per image (averaged over images). " if grid.per_image_metrics else "")
        + "wall (min) = every step the cell's replicates needed (shared fits counted in each cell that uses "
        "them).\n",
        markdown_table(rows),
    ]
    if grid.notes:
        parts.append(grid.notes.strip() + "\n")
    parts += [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(parts) + "\n"


def write_results(grid: Grid, options: Options) -> dict[str, Path]:
    """results/ablations/<grid>/table.md, table.csv, summary.csv and one <metric>.png per metric."""
    out = Path(options.results_dir) / "ablations" / grid.name
    out.mkdir(parents=True, exist_ok=True)
    rows = collect(grid, options)
    plots = write_plots(rows, out)
    paths = {
        "md": out / "table.md",
        "csv": out / "table.csv",
        "summary": out / "summary.csv",
        **{p.stem: p for p in plots},
    }
    write_csv(grid, rows, paths["csv"])
    write_summary_csv(rows, paths["summary"])
    paths["md"].write_text(report_markdown(grid, rows, plots))
    return paths
