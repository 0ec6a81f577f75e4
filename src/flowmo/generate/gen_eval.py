"""`flowmo gen-eval`: gFID / IS / precision / recall of a generator decoded by its tokenizer -> a JSON report.

    flowmo gen-eval --generator runs/gen-paper/checkpoints/last.ckpt --tokenizer lo \
        --reference data/imagenet/train.json --num-samples 50000 --devices 8 --out results/gen/report.json

Sampling runs under Lightning predict: rank r generates every world-th batch of the class-balanced label list
(seeded per rank), extracts the Inception features there and saves them; rank 0 computes the metrics from all
ranks' features (flowmo.generate.evaluate has the protocol) and writes the report. Reference statistics are
computed once and cached (`--cache`, default beside the report).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from flowmo.generate.evaluate import GenerationFeatures, metrics_from_features


class SamplePredictor(L.LightningModule):
    """One predict step = one batch of labels: generate ids, decode them, extract features; saved per rank."""

    def __init__(
        self,
        generator,
        tokenizer,
        features: GenerationFeatures,
        label_batches: list,
        settings: dict,
        sampler: str,
        seed: int,
        out_dir: Path,
    ):
        super().__init__()
        self.generator_network = generator.network  # submodules: Lightning moves them to this rank's device
        self.tokenizer, self.features = tokenizer, features
        self._generator = [generator]  # the LightningModule itself, unregistered: it is not this module's child
        self.label_batches, self.settings, self.sampler = label_batches, settings, sampler
        self.seed, self.out_dir = seed, out_dir
        self.pools: list = []
        self.logits: list = []

    def predict_dataloader(self) -> DataLoader:
        mine = self.label_batches[self.global_rank :: self.trainer.world_size]
        return DataLoader(mine or [torch.empty(0, dtype=torch.long)], batch_size=None)

    def on_predict_start(self) -> None:
        self._generator[0].to(self.device)  # its `device` (read by generate) follows only its own .to()
        self.rng = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + self.global_rank)

    def predict_step(self, labels: torch.Tensor, batch_idx: int) -> int:
        if labels.numel() == 0:
            return 0
        ids = self._generator[0].generate(labels.to(self.device), generator=self.rng, **self.settings)
        images = self.tokenizer.detokenize(ids, generator=self.rng, sampler=self.sampler)
        pool, logits = self.features(((images.float() + 1) / 2).clamp(0, 1))
        self.pools.append(pool.float().cpu())
        self.logits.append(logits.float().cpu())
        return len(labels)

    def on_predict_end(self) -> None:
        empty = torch.empty(0, self.features.head.shape[1]), torch.empty(0, self.features.head.shape[0])
        pool = torch.cat(self.pools) if self.pools else empty[0]
        logits = torch.cat(self.logits) if self.logits else empty[1]
        torch.save({"pool": pool, "logits": logits}, self.out_dir / f"features-rank{self.global_rank}.pt")


def sample_and_measure(
    generator,
    tokenizer,
    features: GenerationFeatures,
    reference: dict,
    num_samples: int,
    batch: int,
    settings: dict,
    sampler: str,
    seed: int,
    work_dir: Path,
    accelerator: str = "auto",
    devices: int | str = "auto",
    strategy: str = "auto",
) -> dict | None:
    """The report on rank 0 (None on other ranks); `work_dir` receives each rank's features."""
    labels = torch.arange(num_samples) % generator.layout.num_classes
    work_dir.mkdir(parents=True, exist_ok=True)
    for old in work_dir.glob("features-rank*.pt"):
        old.unlink()
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        precision="32-true",
        logger=False,
        enable_progress_bar=True,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    predictor = SamplePredictor(
        generator, tokenizer, features, list(labels.split(batch)), settings, sampler, seed, work_dir
    )
    trainer.predict(predictor, return_predictions=False)
    trainer.strategy.barrier()  # every rank's features are on disk
    if not trainer.is_global_zero:
        return None
    parts = [torch.load(path, weights_only=True) for path in sorted(work_dir.glob("features-rank*.pt"))]
    pool, logits = torch.cat([p["pool"] for p in parts]), torch.cat([p["logits"] for p in parts])
    return metrics_from_features(reference, pool, logits, features)
