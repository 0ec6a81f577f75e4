"""`data/skipped_samples`: corrupt or unreadable samples the DataModule skipped, as a logged metric.

DESIGN.md: corrupt samples are skipped, counted and reported, never fatal. The count is cumulative since
the process started and summed over ranks (each rank counts its own loaders). It is logged only on logging
steps and at the end of validation/test, so the per-step cost is nil.
"""

from __future__ import annotations

import lightning as L


class SkippedSamples(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:  # same on every rank: the sum is safe
            self._log(trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, pl_module)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._log(trainer, pl_module)

    @staticmethod
    def _log(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        count = getattr(trainer.datamodule, "skipped_samples", None)
        if count is None:  # plain DataLoaders (tests, notebooks) count nothing
            return
        pl_module.log("data/skipped_samples", float(count), reduce_fx="sum", sync_dist=True)
