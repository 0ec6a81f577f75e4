"""Run by tests/test_ddp_resume.py: a 2-process DDP fit (gloo, CPU) in which only rank 1's first batch holds a
NaN. Each rank writes what it saw to OUT/rank{r}.pt: its skip count and its weights after steps 1 and 2."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from flowmo.flow import SamplerSettings
from flowmo.losses import LossRecipe
from flowmo.module import FlowMoModule
from flowmo.settings import EvalSettings, OptimSettings

warnings.filterwarnings("ignore")


class Images(Dataset):
    """4 images; the DistributedSampler (no shuffle) gives rank 0 images 0, 2 and rank 1 images 1, 3."""

    def __init__(self):
        self.images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
        self.images[1, 0, 4, 4] = float("nan")

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return {"image": self.images[index]}


class Record(L.Callback):
    def __init__(self):
        self.seen = {"weights": []}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.seen["weights"].append([p.detach().clone() for p in module.tokenizer.parameters()])

    def on_train_end(self, trainer, module):
        self.seen["skipped"] = module.skipped_nonfinite
        self.seen["initial"] = self.initial
        torch.save(self.seen, Path(sys.argv[1]) / f"rank{trainer.global_rank}.pt")

    def on_train_start(self, trainer, module):
        self.initial = [p.detach().clone() for p in module.tokenizer.parameters()]


if __name__ == "__main__":
    torch.manual_seed(0)
    model = FlowMoModule(
        preset="tiny",
        loss=LossRecipe(perceptual="none"),
        optim=OptimSettings(freeze_encoder_after=None, ema_every=1, lr=1e-3),
        eval=EvalSettings(sampler=SamplerSettings(steps=2)),
        feature_weights="random",
    )
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        precision="32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Record()],
        use_distributed_sampler=True,
    )
    trainer.fit(model, DataLoader(Images(), batch_size=1, shuffle=False))
