"""Running a plan: here, up to --jobs processes at once (resumable: finished fits resume, current tests are
skipped), or as SLURM jobs chained by their dependencies."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from flowmo.ablate.grid import Cell, Grid, Options
from flowmo.ablate.plan import Step, metrics_path, test_run
from flowmo.ablate.results import METRICS, read_metrics, timings_path
from flowmo.data.sample_set import ensure_sample_data
from flowmo.errors import UserError

STATUS_EVERY_S = 60.0  # how often the runner prints one line per running step


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_jobs(jobs: int, gpus: int | None) -> None:
    """--jobs: at least 1, at most the cores here, and 1 when every step already takes the node's GPUs."""
    cores = available_cores()
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}.")
    if jobs > cores:
        raise UserError(
            f"--jobs {jobs} asks for more steps at once than this machine's {cores} cores can run "
            f"(each needs at least one thread); use --jobs between 1 and {cores}."
        )
    if jobs > 1 and gpus is not None:
        raise UserError(
            f"--jobs {jobs} with --gpus would start {jobs} steps on the same {gpus} GPUs; use --jobs 1 "
            "(each step already uses every GPU) or the SLURM launcher."
        )


def _test_is_current(grid: Grid, step: Step, options: Options) -> bool:
    metrics, ckpt = metrics_path(grid, grid.cell(step.cell), step.seed, options), Path(step.checkpoint)
    return metrics.is_file() and ckpt.is_file() and metrics.stat().st_mtime >= ckpt.stat().st_mtime


def log_path(step: Step, options: Options) -> Path:
    """Each step's full output, appended across attempts: runs/<run>/<fit|test>.log."""
    return Path(options.runs_dir) / step.run_name / f"{step.action}.log"


@dataclass
class _Running:
    step: Step
    process: subprocess.Popen
    log: IO[bytes]
    started: float


def execute(grid: Grid, steps: list[Step], options: Options, force: bool = False, jobs: int = 1) -> list[Step]:
    """Run the steps, up to `jobs` at once, each in a fresh `python -m flowmo` process with its output in its run
    folder (memory freed between runs; Lightning's DDP launcher re-runs the process's own command line on every
    rank, which must be the single fit or test). With jobs > 1 the cores are split evenly between the processes.
    A step that fails is reported and what needs it is not run; the others go on. Returns the failed steps."""
    return LocalRunner(grid, options, force, jobs).run(steps)


class LocalRunner:
    """The local scheduler: starts each step once what it needs has finished, at most `jobs` at a time."""

    def __init__(self, grid: Grid, options: Options, force: bool, jobs: int) -> None:
        self.grid, self.options, self.force, self.jobs = grid, options, force, jobs
        self.threads = max(1, available_cores() // jobs) if jobs > 1 else None
        self.running: list[_Running] = []
        self.finished: set[str] = set()
        self.failed: list[Step] = []
        self.blocked: set[str] = set()  # not run: a step they need failed

    def run(self, steps: list[Step]) -> list[Step]:
        pending, last_status = list(steps), time.time()
        stop = []  # SIGTERM (a scheduler, `kill`): stop the children too, then leave
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
        try:
            while pending or self.running:
                self._start_ready(pending)
                if pending and not self.running:  # nothing runs and nothing can start: a need outside the plan
                    raise RuntimeError(f"ablate plan: {pending[0].key} needs {pending[0].needs}, which no step gives")
                time.sleep(0.2)
                for job in [j for j in self.running if j.process.poll() is not None]:
                    self.running.remove(job)
                    self._finish(job)
                if self.running and time.time() - last_status >= STATUS_EVERY_S:
                    self._print_status()
                    last_status = time.time()
                if stop:
                    raise KeyboardInterrupt
        finally:
            signal.signal(signal.SIGTERM, previous)
            self._stop_children()
        if self.failed:
            print(
                f"[ablate] {len(self.failed)} step(s) failed: "
                + ", ".join(f"{s.key} (log {log_path(s, self.options)})" for s in self.failed),
                flush=True,
            )
        return self.failed

    def _stop_children(self) -> None:
        """An interrupted runner leaves no orphan writing into a run folder."""
        for job in self.running:
            job.process.terminate()
        for job in self.running:
            job.process.wait()
            job.log.close()

    def _start_ready(self, pending: list[Step]) -> None:
        failed = {f.key for f in self.failed}
        for step in list(pending):
            if len(self.running) >= self.jobs:
                return
            if any(need in self.blocked or need in failed for need in step.needs):
                pending.remove(step)
                self.blocked.add(step.key)
                print(f"[ablate] {step.key}: not run, a step it needs failed", flush=True)
            elif all(need in self.finished for need in step.needs):
                pending.remove(step)
                if step.action == "test" and not self.force and _test_is_current(self.grid, step, self.options):
                    print(
                        f"[ablate] {step.key}: skipped, its metrics are newer than {step.checkpoint} (--force reruns)",
                        flush=True,
                    )
                    self.finished.add(step.key)
                else:
                    self.running.append(self._launch(step))

    def _launch(self, step: Step) -> _Running:
        path = log_path(step, self.options)
        path.parent.mkdir(parents=True, exist_ok=True)
        log = path.open("ab")
        log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {step.shell()}\n".encode())
        log.flush()
        env = dict(os.environ)
        if self.threads is not None:
            env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        process = subprocess.Popen(
            [sys.executable, "-m", "flowmo", *step.argv], stdout=log, stderr=subprocess.STDOUT, env=env
        )
        threads = f" ({self.threads} thread(s))" if self.threads else ""
        print(f"[ablate] {step.key}: started{threads}, log {path}", flush=True)
        return _Running(step, process, log, time.time())

    def _finish(self, job: _Running) -> None:
        job.log.close()
        step, seconds = job.step, round(time.time() - job.started, 1)
        if job.process.returncode:
            self.failed.append(step)
            path = log_path(step, self.options)
            print(
                f"[ablate] {step.key} failed (exit {job.process.returncode}) after {seconds:.0f} s; the end of "
                f"{path}:\n{_tail(path, 15)}",
                flush=True,
            )
            return
        self.finished.add(step.key)
        print(f"[ablate] {step.key}: done in {seconds / 60:.1f} min", flush=True)
        _record_time(self.grid, step, seconds, self.options)
        if step.action == "test":
            log_hparams(self.grid, self.grid.cell(step.cell), step.seed, self.options)

    def _print_status(self) -> None:
        """One line per running step: its elapsed time and the last line its log shows (the progress bar's)."""
        stamp = time.strftime("%H:%M:%S")
        for job in self.running:
            last = _tail(log_path(job.step, self.options), 1)[:110]
            print(f"[ablate {stamp}] {job.step.key} {(time.time() - job.started) / 60:5.1f} min | {last}", flush=True)


def _record_time(grid: Grid, step: Step, seconds: float, options: Options) -> None:
    timings_file = timings_path(grid, options)
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    entry = timings.get(step.key, {})
    # a resumed fit adds to the time already spent; a fit that found itself finished adds ~nothing
    timings[step.key] = {
        "seconds": round(entry.get("seconds", 0.0) + seconds, 1) if step.action == "fit" else seconds,
        "run": step.run_name,
    }
    timings_file.parent.mkdir(parents=True, exist_ok=True)
    timings_file.write_text(json.dumps(timings, indent=1) + "\n")


def _tail(path: Path, lines: int) -> str:
    """The last non-empty lines of a log (a progress bar's carriage returns count as line ends)."""
    text = path.read_bytes()[-20000:].decode(errors="replace").replace("\r", "\n")
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


def log_hparams(grid: Grid, cell: Cell, seed: int, options: Options) -> Path | None:
    """One replicate's axis values, seed and final metrics in TensorBoard's HParams tab (runs/<test run>/hparams)."""
    found = read_metrics(metrics_path(grid, cell, seed, options), grid.per_image_metrics)
    if found is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    folder = Path(options.runs_dir) / test_run(grid, cell, seed) / "hparams"
    hparams = {"grid": grid.name, "cell": cell.name, "seed": seed, **{v.axis: v.name for v in cell.choice}}
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
    submit = [
        "#!/bin/bash",
        f"# Submits the {grid.name} grid: {len(steps)} jobs, dependent ones chained.",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
    ]
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
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={step.run_name}-{step.action}",
        f"#SBATCH --nodes={slurm.nodes}",
        f"#SBATCH --ntasks-per-node={slurm.gpus_per_node}",
        f"#SBATCH --gpus-per-node={slurm.gpus_per_node}",
        f"#SBATCH --output={folder.resolve()}/%x-%j.out",
    ]
    lines += [f"#SBATCH --partition={slurm.partition}"] if slurm.partition else []
    lines += [f"#SBATCH --time={slurm.time}"] if slurm.time else []
    lines += [f"#SBATCH --account={slurm.account}"] if slurm.account else []
    lines += [f"#SBATCH --cpus-per-task={slurm.cpus_per_task}"] if slurm.cpus_per_task else []
    if step.action == "fit":
        lines += ["#SBATCH --signal=SIGUSR1@90", "#SBATCH --requeue"]
    lines += [
        "",
        f"cd {shlex.quote(str(Path.cwd()))}",
        "# one task per GPU; Lightning reads the SLURM environment (ranks, nodes, requeue on SIGUSR1)",
        "srun " + shlex.join((slurm.python, "-m", "flowmo", *step.argv)),
    ]
    return "\n".join(lines) + "\n"


def build_sample_set(grid: Grid) -> None:
    """Tiny grids train on the demo's sample shards: build them (once) with the grid's settings."""
    if not grid.sample_set:
        return
    settings = grid.sample_set
    ensure_sample_data(
        Path(settings.get("out", "data/demo")),
        int(settings.get("size", 32)),
        int(settings.get("train_crops", 600)),
        int(settings.get("val_crops", 16)),
        float(settings.get("tint_grey", -1.0)),
    )
