"""Which periodic checkpoints a long run keeps: the newest `keep_last` and every `keep_every`-th step (the authors'
keep_every). A Lo checkpoint is 13.9 GB (weights, EMA, Adam); keeping all 260 of a 1.3M-step run is 3.6 TB, this
policy with its defaults (3, 100k) about 17 files, 0.24 TB. last.ckpt, SLURM's hpc_ckpt_* and any file not named
like a periodic checkpoint (stepNNNNNNN.ckpt) are never touched."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

STEP_FILE = re.compile(r"step(\d+)\.ckpt")


class CheckpointRetention(L.Callback):
    def __init__(self, keep_last: int = 3, keep_every: int | None = 100_000):
        if keep_last < 1 or (keep_every is not None and keep_every < 1):
            raise ValueError(
                f"CheckpointRetention keeps keep_last >= 1 newest and every keep_every >= 1 steps "
                f"(or null), got keep_last={keep_last}, keep_every={keep_every}."
            )
        self.keep_last, self.keep_every = keep_last, keep_every

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """Before each save: the file being written is the newest, so `keep_last` older ones stay beside it until
        the next save (at most keep_last + 1 exist, never fewer than keep_last readable ones)."""
        self.prune(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.prune(trainer)

    def prune(self, trainer: L.Trainer) -> list[Path]:
        callback = trainer.checkpoint_callback
        if not trainer.is_global_zero or callback is None or not callback.dirpath:
            return []
        removed = []
        for path in self.removable(Path(callback.dirpath), trainer.global_step):
            try:
                path.unlink()
                removed.append(path)
            except OSError as error:  # a shared file system's hiccup must not stop a ten-day run
                print(f"flowmo: could not remove old checkpoint {path}: {error}", file=sys.stderr)
        return removed

    def removable(self, folder: Path, step_now: int) -> list[Path]:
        """Only this run's past: a file of a later step than the run has reached was not written by it (a run
        directory holds one run, flowmo.run_dir; this keeps another's files safe even if that is broken)."""
        steps = sorted(
            (
                (int(m.group(1)), p)
                for p in folder.glob("step*.ckpt")
                if (m := STEP_FILE.fullmatch(p.name)) and int(m.group(1)) <= step_now
            ),
            reverse=True,
        )
        newest = {step for step, _ in steps[: self.keep_last]}
        return [path for step, path in steps if step not in newest and not self._milestone(step)]

    def _milestone(self, step: int) -> bool:
        return self.keep_every is not None and step % self.keep_every == 0


class BestRfidCheckpoint(ModelCheckpoint):
    """Keeps the checkpoint of the lowest val/rfid as best-rfid.ckpt: Stage 1B's selection (it reward-hacks its loss
    if run too long, method §5). A run that computes no rFID (model.eval.rfid false: the CPU demo, tests without
    Inception weights) has nothing to select on, and then keeps nothing instead of failing at its first validation."""

    def __init__(self, filename: str = "best-rfid", **kwargs):
        super().__init__(monitor="val/rfid", mode="min", save_top_k=1, filename=filename, **kwargs)
        self.selects = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        settings = getattr(pl_module, "eval_settings", None)
        self.selects = settings is None or settings.rfid

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        if self.selects:
            super()._save_topk_checkpoint(trainer, monitor_candidates)
