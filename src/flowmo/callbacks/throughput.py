"""Steps/s and images/s over the last logging window, measured without synchronising the device.

The window is long (log_every_n_steps optimizer steps), so queued GPU work evens out; no
cuda.synchronize() is added to the step.
"""

from __future__ import annotations

import time

import lightning as L


class Throughput(L.Callback):
    def __init__(self) -> None:
        self._window_start: float | None = None
        self._window_step = 0
        self._window_images = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        images = batch["image"] if isinstance(batch, dict) else batch
        self._window_images += images.shape[0] * trainer.world_size
        now = time.perf_counter()
        if self._window_start is None:
            self._window_start, self._window_step, self._window_images = now, trainer.global_step, 0
            return
        steps = trainer.global_step - self._window_step
        if steps >= max(1, trainer.log_every_n_steps):
            elapsed = now - self._window_start
            pl_module.log_dict(
                {"train/steps_per_s": steps / elapsed, "train/images_per_s": self._window_images / elapsed},
                rank_zero_only=True,
            )
            self._window_start, self._window_step, self._window_images = now, trainer.global_step, 0
