"""Running a plan: here, one process per step (resumable: finished fits resume, current tests are skipped), or
as SLURM jobs chained by their dependencies."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from flowmo.ablate.grid import Cell, Grid, Options
from flowmo.ablate.plan import Step, metrics_path, test_run
from flowmo.ablate.results import METRICS, read_metrics, timings_path
from flowmo.data.sample_set import ensure_sample_data


def _test_is_current(grid: Grid, step: Step, options: Options) -> bool:
    cell = next(c for c in grid.cells if c.name == step.cell)
    metrics, ckpt = metrics_path(grid, cell, options), Path(step.checkpoint)
    return metrics.is_file() and ckpt.is_file() and metrics.stat().st_mtime >= ckpt.stat().st_mtime


def execute(grid: Grid, steps: list[Step], options: Options, force: bool = False) -> None:
    """Run every step in a fresh `python -m flowmo` process (memory freed between runs; Lightning's DDP
    launcher re-runs the process's own command line on every rank, which must be the single fit or test)."""
    timings_file = timings_path(grid, options)
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
              "set -euo pipefail", 'cd "$(dirname "$0")"']
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


def build_sample_set(grid: Grid) -> None:
    """Tiny grids train on the demo's sample shards: build them (once) with the grid's settings."""
    if not grid.sample_set:
        return
    settings = grid.sample_set
    ensure_sample_data(Path(settings.get("out", "data/demo")), int(settings.get("size", 32)),
                       int(settings.get("train_crops", 600)), int(settings.get("val_crops", 16)),
                       float(settings.get("tint_grey", -1.0)))
