"""A grid's results: each replicate's metrics.json read back into rows with means, 95% intervals over seeds and
paired differences from the base (flowmo.ablate.stats), plus the reference codecs' rows. The table and the
charts are written by flowmo.ablate.table."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from flowmo.ablate.grid import Cell, Grid, Options, axis_of
from flowmo.ablate.plan import Step, metrics_path, plan, test_key, trained_name
from flowmo.ablate.stats import Estimate, mean_interval, paired_difference

METRICS = ("psnr", "ssim", "lpips", "rfid", "codebook")  # columns of the table; paper numbers where known
METRIC_KEYS = {
    "psnr": ("psnr_paper", "psnr"),
    "ssim": ("ssim_paper", "ssim"),
    "lpips": ("lpips_alex", "lpips_vgg", "lpips"),
    "rfid": ("rfid", "fid"),
    "codebook": ("codebook_used_fraction",),
}
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
    found: dict = {
        "num_images": report.get("num_images"),
        "stand_ins": list(report.get("stand_ins") or []),
        "bits_per_pixel": report.get("bits_per_pixel"),
    }
    preferences = dict(METRIC_KEYS)
    if per_image:
        preferences.update(psnr=("psnr", "psnr_paper"), ssim=("ssim", "ssim_paper"))
    for metric, keys in preferences.items():
        key = next((k for k in keys if _lookup(pools, k) is not None), None)
        if key is not None:
            found[metric], found[f"{metric}_key"] = _lookup(pools, key), key
    # the reference codecs on the same images, read with the same PSNR / SSIM definitions as the cell
    found["references"] = {
        name: {
            "label": scores.get("label", name),
            "bits_per_pixel": scores.get("bits_per_pixel"),
            **{m: _lookup([scores], found[f"{m}_key"]) for m in METRICS if found.get(f"{m}_key")},
        }
        for name, scores in (report.get("references") or {}).items()
    }
    return found


@dataclass(frozen=True)
class Row:
    """One cell (or reference codec) over its replicates: per metric the values by seed, their mean ± 95%
    interval, and the difference from the base paired by seed (None on the base row and for a metric not measured)."""

    cell: str
    changes: str
    seeds: tuple[int, ...]
    values: dict[str, dict[int, float | None]]  # metric -> seed -> value (None: that replicate is missing)
    estimates: dict[str, Estimate]
    deltas: dict[str, Estimate | None]
    paper: dict[str, float | None]
    keys: dict[str, str | None]  # which metrics.json key each metric was read from
    bits_per_pixel: float | None
    steps: str | None = None
    wall_min: float | None = None  # every step the cell's replicates needed, summed over seeds
    notes: str = ""
    reference: bool = False


def collect(grid: Grid, options: Options) -> list[Row]:
    """One row per cell (numbers None where a replicate is missing), then the reference codecs' rows."""
    timings_file = timings_path(grid, options)
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    steps = {s.key: s for s in plan(grid, options)}
    found = {
        (cell.name, seed): read_metrics(metrics_path(grid, cell, seed, options), grid.per_image_metrics)
        for cell in grid.cells
        for seed in grid.seeds
    }
    base_values = _values(grid, grid.cells[0], found)
    rows = []
    for cell in grid.cells:
        values = _values(grid, cell, found)
        reports = [found[cell.name, seed] for seed in grid.seeds if found[cell.name, seed] is not None]
        first = reports[0] if reports else {}
        chains = [_chain(steps, test_key(cell, seed)) for seed in grid.seeds]
        spent = [timings.get(s.key, {}).get("seconds") for chain in chains for s in chain]
        rows.append(
            Row(
                cell=cell.name,
                changes=", ".join(f"{v.axis}: {v.label}" for v in cell.changes(grid)) or "base",
                seeds=grid.seeds,
                values=values,
                estimates={m: mean_interval(values[m].values()) for m in METRICS},
                deltas={
                    m: None if cell is grid.cells[0] or not values[m] else paired_difference(values[m], base_values[m])
                    for m in METRICS
                },
                paper={m: cell.paper.get(m) for m in METRICS},
                keys={m: first.get(f"{m}_key") for m in METRICS},
                bits_per_pixel=first.get("bits_per_pixel"),
                steps="+".join(str(_max_steps(s)) for s in chains[0] if s.action == "fit") or None,
                wall_min=round(sum(spent) / 60, 1) if spent and None not in spent else None,
                notes="; ".join(_notes(grid, cell, reports)),
            )
        )
    return rows + reference_rows(grid, found, base_values)


def _values(grid: Grid, cell: Cell, found: dict) -> dict[str, dict[int, float | None]]:
    """metric -> seed -> value: None where the replicate's report is missing (a failed or unfinished run); a
    metric its reports do not have (codebook use of an FSQ code without token ids) is left out, not missing."""
    values: dict[str, dict[int, float | None]] = {m: {} for m in METRICS}
    for seed in grid.seeds:
        report = found[cell.name, seed]
        for metric in METRICS:
            if report is None or report.get(metric) is not None:
                values[metric][seed] = None if report is None else report[metric]
    return values


def reference_rows(grid: Grid, found: dict, base_values: dict[str, dict[int, float | None]]) -> list[Row]:
    """The codecs that cost nothing to train (flowmo.references), scored by the tests on the same held-out
    images; read from the base cell's first report that has them. Their Δ pairs with the base's seeds."""
    reports = [found[grid.cells[0].name, seed] for seed in grid.seeds]
    references = next((r["references"] for r in reports if r and r.get("references")), {})
    rows = []
    for name, scores in references.items():
        values = {m: {seed: scores[m] for seed in grid.seeds} if scores.get(m) is not None else {} for m in METRICS}
        rows.append(
            Row(
                cell=name,
                changes=scores.get("label", name),
                seeds=grid.seeds,
                values=values,
                estimates={m: mean_interval([scores[m]] if values[m] else []) for m in METRICS},
                deltas={m: paired_difference(values[m], base_values[m]) if values[m] else None for m in METRICS},
                paper={m: None for m in METRICS},
                keys={m: None for m in METRICS},
                bits_per_pixel=scores.get("bits_per_pixel"),
                notes="reference: nothing trained",
                reference=True,
            )
        )
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


def _notes(grid: Grid, cell: Cell, reports: list[dict]) -> list[str]:
    notes = []
    evaluated = [v for v in cell.of_kind(grid, "eval") if v is not axis_of(grid, v).base]
    if evaluated:
        notes.append("evaluation only: tests the checkpoints of " + trained_name(grid, cell).removeprefix("ablate-"))
    if not reports:
        return notes + ["not run yet"]
    if len(reports) < len(grid.seeds):
        notes.append(f"{len(grid.seeds) - len(reports)} of {len(grid.seeds)} replicates missing")
    stand_ins = sorted({name for r in reports for name in r["stand_ins"]})
    if stand_ins:
        notes.append(f"STAND-IN NETS ({', '.join(stand_ins)}): numbers mean nothing")
    if reports[0].get("psnr_key") == "psnr" and not grid.per_image_metrics:
        notes.append("per-image PSNR")
    if reports[0].get("lpips_key") not in (None, "lpips_alex"):
        notes.append(f"LPIPS = {reports[0]['lpips_key']}")
    return notes
