"""Input | reconstruction grids of fixed validation batches, to TensorBoard and as PNG files."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torchvision.utils import make_grid, save_image


def side_by_side(columns: list[torch.Tensor], max_rows: int = 8) -> torch.Tensor:
    """[B, 3, H, W] tensors in [-1, 1] -> one grid image in [0, 1]: a row per image, a column per tensor."""
    rows = [torch.stack([c[i] for c in columns]) for i in range(min(max_rows, columns[0].shape[0]))]
    grid = make_grid(torch.cat(rows), nrow=len(columns), padding=2, pad_value=1.0)
    return ((grid + 1) / 2).clamp(0, 1)


class ReconstructionGrid(L.Callback):
    """Logs input | reconstruction for the first `batches` validation batches (fixed keys: same images)."""

    def __init__(self, batches: int = 1, max_rows: int = 8, png_dir: str | None = None) -> None:
        self.batches, self.max_rows, self.png_dir = batches, max_rows, png_dir

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx >= self.batches or not trainer.is_global_zero or not isinstance(outputs, dict):
            return
        grid = side_by_side([outputs["images"].float().cpu(), outputs["reconstructions"].float().cpu()], self.max_rows)
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image(f"val/reconstructions_{batch_idx}", grid, global_step=trainer.global_step)
        if self.png_dir:
            path = Path(self.png_dir) / f"val_step{trainer.global_step:07d}_batch{batch_idx}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_image(grid, path)
