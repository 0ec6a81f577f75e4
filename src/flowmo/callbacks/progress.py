"""A progress bar in optimizer steps (not micro-batches) showing the loss and images/s.

Lightning's bar counts micro-batches of an infinite epoch: it read 200/200 at step 100 with accumulation 2,
then 201/?, and showed no loss. This one counts optimizer steps against max_steps and shows train/total and
the Throughput callback's images/s.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

SHOWN = {"train/total": "loss", "train/images_per_s": "img/s", "train/skipped_nonfinite": "skipped"}


class StepProgressBar(TQDMProgressBar):
    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        super().on_train_epoch_start(trainer)
        bar = self.train_progress_bar
        bar.total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        bar.initial = trainer.global_step
        bar.n = trainer.global_step
        bar.set_description("step")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        if bar is None or bar.disable or trainer.global_step == bar.n:
            return  # a micro-batch inside an accumulation: no optimizer step yet
        if trainer.global_step % max(1, self.refresh_rate) and trainer.global_step != bar.total:
            return
        bar.n = trainer.global_step
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.refresh()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = trainer.callback_metrics
        shown = {}
        for key, label in SHOWN.items():
            if key in metrics:
                value = float(metrics[key])
                shown[label] = f"{value:.4f}" if label == "loss" else f"{value:.1f}" if label == "img/s" else int(value)
        return shown
