"""Faults a ten-day run meets, and what each one costs (nothing, or the steps since the last save):

- a checkpoint save that dies half-way (full disk, killed process): `AtomicCheckpointIO` writes a temporary
  file beside the target, fsyncs it and renames it over the target, so the previous file stays intact; a failed
  save removes its temporary file and stops the run with one sentence;
- preemption: `Preemption` turns SIGTERM (and SIGUSR1 outside SLURM's own requeue handling) into a
  checkpoint written at the end of the current optimizer step, then an exit with EXIT_PREEMPTED;
- resume: `latest_checkpoint` is the one notion of "latest" behind `--ckpt_path last` (and a requeued job's start):
  the readable file holding the most optimizer steps among the run's last.ckpt, step checkpoints and SLURM's
  hpc_ckpt_*.ckpt; an unreadable one is reported and skipped; with none, the run says loudly that it starts from
  step 0 (which run a directory holds, and which process writes it: flowmo.run_dir).
- a non-finite loss or gradient: `flowmo.nonfinite.NonFiniteGuard` skips that optimizer step on the device (fused Adam's
  found_inf; the projection and the EMA follow the same flag), with one decision for all ranks, and counts it; the
  counters are read at logging steps only, and `max_nonfinite_steps` skips in a row stop the run
  (NonFiniteTraining, naming the terms and the last good checkpoint).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from flowmo.checkpoint import load_weights_file
from flowmo.errors import UserError

EXIT_DIVERGED = 3  # K non-finite steps in a row: nothing non-finite was saved
EXIT_CHECKPOINT_FAILED = 4  # a save failed (e.g. disk full); the previous checkpoint is intact
EXIT_PREEMPTED = 143  # 128 + SIGTERM: a checkpoint of the last finished step was written; resume with last
TEMP_MARK = ".tmp-"


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the previous file of that name is untouched."""


def refuse_non_finite_weights(state_dict: dict) -> None:
    bad = next(
        (name for name, value in state_dict.items() if value.is_floating_point() and not torch.isfinite(value).all()),
        None,
    )
    if bad is not None:
        raise CheckpointSaveError(
            f"refusing to save a checkpoint whose {bad} is not finite; the previous "
            "checkpoints are intact: resume from them with a lower --model.optim.lr."
        )


class NonFiniteTraining(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


# ------------------------------------------------------------------------------------------- atomic saves
class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to `.<name>.tmp-<pid>` in the destination folder, flush + fsync, then rename over the target."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")
        try:
            with open(temporary, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
            _fsync_folder(path.parent)
        except BaseException as error:
            temporary.unlink(missing_ok=True)
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                raise
            previous = (
                f"the previous {path.name} is intact"
                if path.exists()
                else f"no {path.name} was written and the earlier checkpoints are intact"
            )
            raise CheckpointSaveError(
                f"could not write the checkpoint {path} ({error.__class__.__name__}: "
                f"{error}); {previous}. Free space (or fix the folder) and resume with "
                "--ckpt_path last."
            ) from error


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX: the directory entry lives in the folder)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Temporary files of saves that a killed process never finished."""
    removed = []
    for path in Path(folder).glob(f".*{TEMP_MARK}*"):
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


# ------------------------------------------------------------------------------------------- resume
def checkpoint_step(path: Path) -> int | None:
    """The optimizer step a checkpoint holds; None when it cannot be read (a save cut short has no zip directory).
    Each file version is read once (~50 ms of unpickling, the tensors left unread through mmap): a run's start looks
    at its checkpoints twice, a test polls them while the run writes."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    version = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)  # a save renames a new file over the old
    if version not in _STEPS_READ:
        _STEPS_READ[version] = _read_step(path)
    return _STEPS_READ[version]


_STEPS_READ: dict[tuple, int | None] = {}


def _read_step(path: Path) -> int | None:
    try:
        return int(load_weights_file(path, mmap=True)["global_step"])
    except Exception:  # noqa: BLE001 - any failure to read means: not a state to resume from
        return None


def resume_candidates(run_dir: Path) -> list[Path]:
    """A run's checkpoints, newest file first: checkpoints/*.ckpt and SLURM's hpc_ckpt_*.ckpt beside them."""
    checkpoints = Path(run_dir) / "checkpoints"
    found = [p for p in checkpoints.glob("*.ckpt") if not p.name.startswith(".")] if checkpoints.is_dir() else []
    found += list(Path(run_dir).glob("hpc_ckpt_*.ckpt"))  # Lightning's SLURM requeue saves here
    return sorted(found, key=_modified, reverse=True)


def _modified(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # removed by retention since the listing
        return 0.0


def checkpoint_steps(run_dir: Path) -> list[tuple[Path, int | None]]:
    """(file, step) of each of the run's checkpoints, newest file first; step None: unreadable."""
    return [(path, checkpoint_step(path)) for path in resume_candidates(run_dir)]


def newest_state(candidates: list[tuple[Path, int | None]], report=print) -> tuple[Path, int] | None:
    """(file, step) of the readable checkpoint holding the most optimizer steps; of two with the same step, the
    newer file. Steps decide, not names or times: Lightning prefers hpc_ckpt_N by its name, and a copied run loses
    its times. Unreadable files are reported."""
    best = None
    for path, step in candidates:
        if step is None:
            report(f"flowmo: {path} is unreadable (a save cut short?); skipping it.")
        elif best is None or step > best[1]:
            best = (path, step)
    return best


def latest_checkpoint(run_dir: Path, report=print) -> Path | None:
    """The checkpoint `--ckpt_path last` resumes: the newest state of the run (newest_state), or None."""
    newest = newest_state(checkpoint_steps(run_dir), report)
    return newest[0] if newest else None


# ------------------------------------------------------------------------------------------- preemption
class Preemption(L.Callback):
    """SIGTERM / SIGUSR1 -> finish the current optimizer step, save `last.ckpt`, exit with EXIT_PREEMPTED.

    Lightning sets `trainer.received_sigterm` on SIGTERM and raises SIGTERMException at the next batch end; this
    callback saves there. SIGUSR1 is routed to the same path, except under SLURM with Lightning's auto-requeue,
    which saves hpc_ckpt_N.ckpt and requeues by itself (latest_checkpoint resumes from either).

    With accumulate_grad_batches > 1 the next batch end may fall inside an accumulation group: a save there
    loses the gradients of the group's micro-batches already run, and the resumed run took its next optimizer
    step on the rest of the group alone. So a stop asked for inside a group is held until the micro-batch that
    completes the group (its optimizer step), and the saved step then matches the data position exactly.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self.saved: Path | None = None
        self._step_at_batch_start = 0
        self._stop_held = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = self._folder(trainer)
        if trainer.is_global_zero and folder is not None and folder.is_dir():
            for path in remove_stale_temporaries(folder):
                print(f"flowmo: removed {path.name}, left by a save that never finished", file=sys.stderr)
        if not _slurm_requeues(trainer) and hasattr(signal, "SIGUSR1"):
            # the flag Lightning's own SIGTERM handler sets (trainer.received_sigterm is its read-only view)
            connector = trainer._signal_connector
            signal.signal(signal.SIGUSR1, lambda signum, frame: setattr(connector, "received_sigterm", True))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        """Runs before Lightning's check of the flag at this batch's end: hold it inside a group, give it back at
        the group's optimizer step (a skipped non-finite step counts too: the global step still moves)."""
        connector = trainer._signal_connector
        completes_a_step = trainer.global_step != self._step_at_batch_start
        if connector.received_sigterm and not completes_a_step:
            connector.received_sigterm, self._stop_held = False, True
        elif self._stop_held and completes_a_step:
            connector.received_sigterm, self._stop_held = True, False

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        folder = self._folder(trainer)
        if folder is None:
            return
        path = folder / "last.ckpt"
        trainer.save_checkpoint(path)  # every rank calls it; rank 0 writes (atomically, see AtomicCheckpointIO)
        self.saved = path
        if trainer.is_global_zero:
            print(
                f"flowmo: stopped by a signal after step {trainer.global_step}; saved {path}. Resume with "
                f"--ckpt_path last (exit code {EXIT_PREEMPTED}).",
                file=sys.stderr,
            )

    def _folder(self, trainer: L.Trainer) -> Path | None:
        if self.dirpath:
            return Path(self.dirpath)
        callback = trainer.checkpoint_callback
        return Path(callback.dirpath) if callback is not None and callback.dirpath else None


class FinalCheckpoint(L.Callback):
    """last.ckpt always holds the final state of a finished fit. Lightning's ModelCheckpoint saves `last` only on
    its save intervals (or at the end of an epoch), so a run whose max_steps is not a multiple of the interval
    ended with an older last.ckpt, and a resume then repeated the lost steps."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        callback = trainer.checkpoint_callback
        if callback is None or not callback.dirpath or not getattr(callback, "save_last", False):
            return
        path = Path(callback.dirpath) / "last.ckpt"
        if getattr(callback, "_last_global_step_saved", None) != trainer.global_step or not path.is_file():
            trainer.save_checkpoint(path)
        # tell ModelCheckpoint that `last` is written: its own end-of-training save would otherwise write a
        # second copy beside it (last-v1.ckpt, its version counter)
        callback.last_model_path = str(path)
        callback._last_global_step_saved = trainer.global_step
        callback._last_checkpoint_saved = True


def _slurm_requeues(trainer: L.Trainer) -> bool:
    from lightning.fabric.plugins.environments import SLURMEnvironment

    environment = trainer._accelerator_connector.cluster_environment
    return isinstance(environment, SLURMEnvironment) and environment.auto_requeue


def exit_code_for(error: BaseException) -> tuple[int, str] | None:
    """(exit code, one sentence) for the faults a user must act on; None for real bugs (keep the traceback)."""
    if isinstance(error, SIGTERMException):
        return EXIT_PREEMPTED, ""
    if isinstance(error, NonFiniteTraining):
        return EXIT_DIVERGED, str(error)
    if isinstance(error, CheckpointSaveError):
        return EXIT_CHECKPOINT_FAILED, str(error)
    if isinstance(error, (UserError, FileNotFoundError)):  # a bad value, a missing shard or file: the user's to fix
        return 2, str(error)
    return None
