"""TokenDataModule: token shards (`flowmo pretokenize`) -> batches {"ids": int64 [B, L*F], "cls": [B], "key"}.

Train: shards drawn with replacement forever and a shuffle buffer, as the image stream (flowmo.data.stream);
validation: each row once, in order, split by rank and worker. The token manifest's layout and tokenizer hash
are linked into the generator (`flowmo gen fit`), so the model is shaped by, and checked against, its data.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset
from webdataset.tariterators import tarfile_samples
from webdataset.utils import pytorch_worker_info

from flowmo.data.stream import buffer_shuffle, resampled_urls
from flowmo.errors import UserError
from flowmo.generate.tokens import decode_ids, read_token_manifest, token_layout


class TokenStream(IterableDataset):
    """Rows `{"ids": int64 [L*F], "cls": int, "key": str}` of token shards."""

    def __init__(
        self,
        urls: list[str],
        train: bool,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        max_samples: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        start_step: int = 0,
    ):
        """rank / world_size are captured in the main process (workers may not see the process group, and ranks
        must draw different rows); start_step makes a resumed run draw new rows instead of replaying its start."""
        super().__init__()
        self.urls, self.train, self.seed = list(urls), train, seed
        self.shuffle_buffer, self.max_samples = shuffle_buffer, max_samples
        self.rank, self.world_size, self.start_step = rank, world_size, start_step

    def __iter__(self) -> Iterator[dict]:
        rank, world_size, worker, num_workers = pytorch_worker_info()
        if self.rank is not None:
            rank, world_size = self.rank, self.world_size or 1
        rng = random.Random(f"flowmo-tokens-{self.seed}-{self.start_step}-{rank}-{worker}")
        if self.train:
            samples = buffer_shuffle(tarfile_samples(resampled_urls(self.urls, rng)), self.shuffle_buffer, rng)
        else:
            samples = tarfile_samples({"url": url} for url in self.urls[rank::world_size][worker::num_workers])
        for count, sample in enumerate(samples):
            if self.max_samples is not None and not self.train and count >= self.max_samples:
                return
            yield {
                "ids": torch.from_numpy(decode_ids(sample["tokens.npy"]).astype(np.int64)),
                "cls": int(sample["cls"]),
                "key": sample["__key__"],
            }


def collate_tokens(rows: list[dict]) -> dict:
    return {
        "ids": torch.stack([row["ids"] for row in rows]),
        "cls": torch.tensor([row["cls"] for row in rows], dtype=torch.int64),
        "key": [row["key"] for row in rows],
    }


class TokenDataModule(L.LightningDataModule):
    """Args:
    train_tokens: the train split's token manifest (`flowmo pretokenize` writes {split}.json).
    val_tokens: a token manifest for validation loss and sample grids; None = no validation data.
    batch_size, val_batch_size: rows per device and step.
    val_max_samples: at most this many validation rows per reader (None = all).
    num_workers, shuffle_buffer, seed: loader settings.
    """

    def __init__(
        self,
        train_tokens: str,
        val_tokens: str | None = None,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        val_max_samples: int | None = None,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.train_manifest = read_token_manifest(train_tokens)
        self.val_manifest = read_token_manifest(val_tokens) if val_tokens else None
        if self.val_manifest and self.val_manifest["tokenizer"]["sha256"] != self.train_manifest["tokenizer"]["sha256"]:
            raise UserError(
                f"{val_tokens} and {train_tokens} were written by different tokenizers; pretokenize "
                "both splits with the same one."
            )

    @property
    def token_layout(self) -> dict:
        """tokens, groups, codebook_size, num_classes and tokenizer_sha256 of the training tokens."""
        return token_layout(self.train_manifest)

    def _urls(self, which: str) -> list[str]:
        manifest_path = Path(self.hparams[f"{which}_tokens"])
        manifest = self.train_manifest if which == "train" else self.val_manifest
        urls = [str(manifest_path.parent / shard["url"]) for shard in manifest["shards"]]
        missing = [url for url in urls if not Path(url).exists()]
        if missing or manifest["num_samples"] == 0:
            raise UserError(
                f"{manifest_path} lists {'a missing shard ' + missing[0] if missing else 'no rows'}; "
                "run `flowmo pretokenize` again with the same --out to finish it."
            )
        return urls

    def train_dataloader(self) -> DataLoader:
        stream = TokenStream(
            self._urls("train"),
            train=True,
            seed=self.hparams.seed,
            shuffle_buffer=self.hparams.shuffle_buffer,
            **self._placement(),
            start_step=self.trainer.global_step if self.trainer else 0,
        )
        return self._loader(stream, self.hparams.batch_size)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_manifest is None:
            return []
        stream = TokenStream(
            self._urls("val"), train=False, max_samples=self.hparams.val_max_samples, **self._placement()
        )
        return self._loader(stream, self.hparams.val_batch_size or self.hparams.batch_size)

    def _placement(self) -> dict:
        if self.trainer is None:
            return {}
        return {"rank": self.trainer.global_rank, "world_size": self.trainer.world_size}

    def _loader(self, stream: TokenStream, batch_size: int) -> DataLoader:
        return DataLoader(
            stream,
            batch_size=batch_size,
            num_workers=self.hparams.num_workers,
            collate_fn=collate_tokens,
            persistent_workers=self.hparams.num_workers > 0,
        )
