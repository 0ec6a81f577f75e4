"""A run directory (runs/<run_name>/) holds one run, written by one process, so a run never loses its work:

- one process: `RunLock`, a kernel file lock on runs/<name>/.fit.lock holding the writer's pid and host; a second
  `flowmo fit` of the run stops at once naming them. The kernel drops the lock when its process dies (SIGKILL and
  lost nodes included), so there is never a stale lock to clean up;
- one run: a start without --ckpt_path into a directory that holds checkpoints is refused (it would start at step
  0 and overwrite last.ckpt; retention would then delete the first run's files); `--overwrite` starts over after
  moving the earlier run's files aside into superseded-<time>/ (nothing is deleted);
- one lineage: resuming an older checkpoint of the run moves its later checkpoints aside, so the newest state
  (faults.latest_checkpoint: the most steps) is always the one this run continues;
- a restarted job continues: a requeued SLURM job (or a torchrun restart) without --ckpt_path resumes the newest
  state exactly as --ckpt_path last does, not Lightning's pick of hpc_ckpt_N by its name.

Only the launching process (global rank 0) takes the lock and moves files; every rank makes the same checks and
resolves the same checkpoint.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lightning.fabric.plugins.environments import SLURMEnvironment

from flowmo.errors import UserError
from flowmo.faults import checkpoint_step, checkpoint_steps, latest_checkpoint, newest_state

LOCK_NAME = ".fit.lock"
SUPERSEDED = "superseded-"
# Set in the processes a launcher starts: torchrun (RANK, LOCAL_RANK, GROUP_RANK), Lightning's own DDP launcher
# (LOCAL_RANK, NODE_RANK in the ranks it starts), srun (SLURM_PROCID), LSF (JSM_NAMESPACE_RANK).
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def say(message: str) -> None:
    print(message, file=sys.stderr)


def is_launching_process() -> bool:
    """Global rank 0, or the process that will start the other ranks (they inherit rank variables != 0)."""
    return all(os.environ.get(name, "0") == "0" for name in RANK_VARIABLES)


def restart_count() -> int:
    """How often the scheduler started this job again: SLURM counts requeues (`scontrol requeue`, which Lightning's
    SIGUSR1 handler calls, or a preemption) in SLURM_RESTART_COUNT, torchrun its restarts in
    TORCHELASTIC_RESTART_COUNT. 0 for a first start."""
    slurm = int(os.environ.get("SLURM_RESTART_COUNT") or 0) if SLURMEnvironment.detect() else 0
    return max(slurm, int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0))


# ------------------------------------------------------------------------------------------- one process
class RunLock:
    """An fcntl record lock (lockf) on runs/<name>/.fit.lock: held by this process only (not by the data workers it
    forks), dropped by the kernel when the process ends. The file says who holds it."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._descriptor: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's line stays
        try:
            locked = self._lock_or_refuse(descriptor)
        except UserError:
            os.close(descriptor)
            raise
        if not locked:
            os.close(descriptor)
            say(
                f"flowmo: cannot lock {self.path} (a file system without locks?): nothing stops a second process "
                "from writing this run."
            )
            return self
        os.ftruncate(descriptor, 0)
        os.pwrite(
            descriptor,
            f"process {os.getpid()} on host {socket.gethostname()} (started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode(),
            0,
        )
        self._descriptor = descriptor
        return self

    def probe(self) -> None:
        """Refuse now if another process holds the lock, creating nothing: while parsing, before a resume reads its
        checkpoint's hyper-parameters (a full load of a 13.9 GB file)."""
        try:
            descriptor = os.open(self.path, os.O_RDWR)
        except OSError:  # no lock file: no run has started here
            return
        try:
            self._lock_or_refuse(descriptor)
        finally:
            os.close(descriptor)  # and with it the probe's own lock

    def _lock_or_refuse(self, descriptor: int) -> bool:
        """Lock, or refuse naming the holder; False where the file system has no locks."""
        try:
            fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                return False
        holder = os.pread(descriptor, 4096, 0).decode(errors="replace").strip() or "another process"
        raise UserError(
            f"{self.path.parent} is being trained by {holder}; wait for that run to end (or stop it), "
            "or give this one another --run_name."
        )

    def release(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)  # closing drops the lock; the file stays (removing it would race a waiter)
            self._descriptor = None


# ------------------------------------------------------------------------------------------- one run, one lineage
@dataclass(frozen=True)
class Start:
    """What a fit's start continues: a checkpoint or None; `newest`: the run's newest state by choice (`last`)."""

    ckpt_path: str | None
    overwrite: bool
    newest: bool


def start_of(run_dir: Path, ckpt_path: str | None, overwrite: bool) -> Start:
    """While parsing, reading only (Lightning then reads the checkpoint's hyper-parameters): a run another process
    trains is refused, a restarted job and `--ckpt_path last` continue the run's newest state, and --overwrite with
    a checkpoint is a contradiction."""
    if is_launching_process():
        RunLock(run_dir).probe()
    restarts = restart_count()
    # A restarted job continues its run's newest state, whatever its command line started from: the --ckpt_path it
    # was submitted with (a step file, another run's checkpoint) is its first start's, now behind the run's own.
    if restarts and (ckpt_path is None or checkpoint_steps(Path(run_dir))):
        first = " (--overwrite and --ckpt_path applied to its first start only)" if overwrite or ckpt_path else ""
        say(
            f"flowmo: the scheduler restarted this job (restart {restarts}): continuing the run from its newest "
            f"checkpoint, as --ckpt_path last does{first}."
        )
        ckpt_path, overwrite = "last", False
    if overwrite and ckpt_path:
        raise UserError(
            f"--overwrite starts {run_dir} over from step 0 and --ckpt_path {ckpt_path} continues a "
            "checkpoint; give one of the two."
        )
    if ckpt_path == "last":
        return Start(resolve_last(Path(run_dir)), False, newest=True)
    return Start(ckpt_path, overwrite, newest=False)


def claim(run_dir: Path, start: Start) -> RunLock | None:
    """Before anything is built: lock the run (launching process), then keep the directory to one run (refuse, or
    move files aside). Returns the lock to release when the command ends."""
    run_dir = Path(run_dir)
    lock = RunLock(run_dir).acquire() if is_launching_process() else None
    try:
        if start.overwrite:
            start_over(run_dir)
        elif start.newest:  # the run's own newest state: nothing lies ahead of it, unless written since it was read
            still_newest(run_dir, start.ckpt_path)
        else:
            keep_one_lineage(run_dir, start.ckpt_path)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock


def resolve_last(run_dir: Path) -> str | None:
    """`--ckpt_path last`: the newest state of the run, said out loud; with none, a loud note and step 0."""
    latest = latest_checkpoint(run_dir, report=say)
    if latest is None:
        say(f"flowmo: --ckpt_path last: no checkpoint in {run_dir} yet; starting from step 0.")
        return None
    say(f"flowmo: resuming from {latest}")
    return str(latest)


def still_newest(run_dir: Path, ckpt_path: str | None) -> None:
    """A process that saved between this start's parsing and its lock (it ended in that window) made a newer state."""
    newest = latest_checkpoint(run_dir, report=lambda message: None)
    if (str(newest) if newest else None) != ckpt_path:
        raise UserError(
            f"{run_dir} changed while this start was reading it (another process saved {newest}); start it again."
        )


def keep_one_lineage(run_dir: Path, ckpt_path: str | None) -> None:
    """Refuse a start that would mix two runs in one directory; move aside what a resume from an older checkpoint
    leaves ahead of it (another branch of the run, which `last` would otherwise pick by its step count)."""
    held = checkpoint_steps(run_dir)
    if not held:
        return
    newest = newest_state(held, report=lambda message: None)
    described = f"{newest[0]}, step {newest[1]}" if newest else f"{held[0][0]}, unreadable"
    if ckpt_path is None:
        raise UserError(
            f"{run_dir} already holds a run (newest checkpoint: {described}); continue it with "
            "--ckpt_path last (make ... RESUME=1), or start another with a new --run_name (--overwrite "
            "starts this one over, moving its files aside)."
        )
    if not Path(ckpt_path).resolve().is_relative_to(run_dir.resolve()):
        raise UserError(
            f"{run_dir} already holds a run of its own (newest checkpoint: {described}); continue "
            f"{ckpt_path} under a new --run_name."
        )
    step = checkpoint_step(Path(ckpt_path))
    ahead = [path for path, later in held if step is not None and later is not None and later > step]
    if ahead and is_launching_process():
        folder = move_aside(run_dir, ahead)
        say(
            f"flowmo: resuming {run_dir} from step {step}: its {len(ahead)} later checkpoint(s) (up to step "
            f"{newest[1]}) moved to {folder}."
        )


def start_over(run_dir: Path) -> None:
    """`--overwrite`: everything of the earlier run (checkpoints, hpc_ckpt_*, logs) into superseded-<time>/."""
    if not is_launching_process() or not run_dir.is_dir():
        return
    earlier = [path for path in run_dir.iterdir() if path.name != LOCK_NAME and not path.name.startswith(SUPERSEDED)]
    if earlier:
        newest = newest_state(checkpoint_steps(run_dir), report=lambda message: None)
        folder = move_aside(run_dir, earlier)
        was = f" (newest checkpoint: step {newest[1]})" if newest else ""
        say(f"flowmo: --overwrite: the earlier run{was} moved to {folder}; starting from step 0.")


def move_aside(run_dir: Path, paths: list[Path]) -> Path:
    """Move paths of run_dir into a new run_dir/superseded-<time>/, keeping their place relative to run_dir."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder, copy = run_dir / f"{SUPERSEDED}{stamp}", 1
    while folder.exists():  # two starts over in one second
        folder, copy = run_dir / f"{SUPERSEDED}{stamp}-{copy}", copy + 1
    for path in paths:
        target = folder / path.relative_to(run_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        path.rename(target)
    return folder
