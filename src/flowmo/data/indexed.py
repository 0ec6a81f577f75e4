"""Training micro-batches drawn by number from indexed local shards: what makes a resumed run bit-exact.

Micro-batch m of rank r holds B samples drawn with replacement (method §6: a per-rank sampler with
replacement, ranks seeded differently) from an RNG seeded by (seed, r, m) alone; the same RNG then draws each
sample's crop (and flip). So the pixels of every batch depend only on (seed, r, m), never on what was read
before: a run resumed at optimizer step k starts at micro-batch k x accumulate_grad_batches and sees exactly
the batches the uninterrupted run saw from there.

The dataset yields whole collated batches (use it with DataLoader(batch_size=None)). Worker w of W serves
micro-batches start + w, start + w + W, ...; the DataLoader hands an iterable dataset's items to the main
process round-robin over its workers, in order, so the main process sees start, start + 1, ... whatever the
number of workers. A corrupt, unreadable or non-finite sample is counted in the SkipCounter and replaced by the
RNG's next draw, which is as deterministic as the rest.

Every iteration starts at `start_batch`: the data is one infinite epoch, iterated once per loader, and the
DataModule builds each loader at the trainer's current step. (An epoch-limited setup, `limit_train_batches`
with `max_epochs`, would replay the same batches each epoch unless the loader is rebuilt each epoch with
`reload_dataloaders_every_n_epochs: 1`.)
"""

from __future__ import annotations

import os
import random
from collections import OrderedDict
from collections.abc import Iterator
from itertools import count

import torch
from torch.utils.data import IterableDataset

from flowmo.data.index import BAD_LABEL, ShardIndex
from flowmo.data.stream import MAX_FAILURES_IN_A_ROW, SkipCounter, collate, reader_slot
from flowmo.data.transforms import decode_rgb, train_transform

MAX_OPEN_SHARDS = 256  # ImageNet has 1282 train shards; a common open-file limit is 1024 per process


class ShardReader:
    """Random-access reads of one process: files opened on first use, read with pread (an explicit offset, so
    no file position is shared), at most MAX_OPEN_SHARDS kept open (the least recently used is closed)."""

    def __init__(self, shards: list[str]) -> None:
        self.shards = shards
        self._open: OrderedDict[int, int] = OrderedDict()

    def read(self, shard: int, offset: int, size: int) -> bytes:
        data = os.pread(self._descriptor(shard), size, offset)
        if len(data) != size:
            raise OSError(f"short read in {self.shards[shard]}: {len(data)} of {size} bytes at {offset}")
        return data

    def _descriptor(self, shard: int) -> int:
        descriptor = self._open.pop(shard, None)
        if descriptor is None:
            if len(self._open) >= MAX_OPEN_SHARDS:
                os.close(self._open.popitem(last=False)[1])
            descriptor = os.open(self.shards[shard], os.O_RDONLY)
        self._open[shard] = descriptor  # (re)inserted last: the most recently used
        return descriptor

    def close(self) -> None:
        for descriptor in self._open.values():
            os.close(descriptor)
        self._open.clear()


class IndexedBatches(IterableDataset):
    """Collated training micro-batches `{"image": [B, 3, S, S], "cls": [B], "key": [B]}`, numbered from
    `start_batch`, forever. `rank` is captured in the main process (e.g. from the Trainer); None reads
    RANK or torch.distributed like ShardStream."""

    def __init__(
        self,
        index: ShardIndex,
        image_size: int,
        batch_size: int,
        seed: int = 0,
        start_batch: int = 0,
        rank: int | None = None,
        random_flip: bool = False,
        skip_counter: SkipCounter | None = None,
    ) -> None:
        super().__init__()
        if len(index) == 0:
            more = f" and {len(index.shards) - 3} more" if len(index.shards) > 3 else ""
            shown = ", ".join(index.shards[:3]) + more
            raise RuntimeError(
                f"the training shards yield no sample (no image member in any of them): {shown}; "
                "check that the paths hold WebDataset tars of images (flowmo shards writes them)."
            )
        self.index = index
        self.image_size, self.batch_size = image_size, batch_size
        self.seed, self.start_batch, self.rank = seed, start_batch, rank
        self.random_flip = random_flip
        self.skip_counter = skip_counter

    def __iter__(self) -> Iterator[dict]:
        rank, _, worker, num_workers = reader_slot(self.rank)
        reader = ShardReader(self.index.shards)
        try:
            for number in count(self.start_batch + worker, num_workers):
                yield self.micro_batch(number, rank, reader)
        finally:
            reader.close()

    def micro_batch(self, number: int, rank: int, reader: ShardReader) -> dict:
        """Micro-batch `number` of `rank`: a function of (seed, rank, number) and the shards' bytes only."""
        rng = random.Random(f"flowmo-batch-{self.seed}-{rank}-{number}")  # str seeds hash the same everywhere
        return collate([self._draw(rng, reader) for _ in range(self.batch_size)])

    def _draw(self, rng: random.Random, reader: ShardReader) -> dict:
        for _ in range(MAX_FAILURES_IN_A_ROW):
            sample = self._load(rng.randrange(len(self.index)), rng, reader)
            if sample is not None:
                return sample
        raise RuntimeError(
            f"{MAX_FAILURES_IN_A_ROW} samples in a row failed to decode (shards {self.index.shards[:2]}...): these "
            "are not image shards written by `flowmo shards`, or they are badly damaged"
        )

    def _load(self, i: int, rng: random.Random, reader: ShardReader) -> dict | None:
        index = self.index
        try:
            if index.label[i] == BAD_LABEL:
                raise ValueError("label is not an integer")
            image = decode_rgb(reader.read(int(index.shard[i]), int(index.offset[i]), int(index.size[i])))
            tensor = train_transform(image, self.image_size, rng, self.random_flip)
            if not torch.isfinite(tensor).all():  # one NaN pixel would poison every weight within a step
                raise ValueError("non-finite pixel")
        except Exception:  # corrupt JPEG, unreadable bytes, bad label: skip it, count it, draw again
            if self.skip_counter is not None:
                self.skip_counter.add()
            return None
        return {"image": tensor, "cls": int(index.label[i]), "key": index.key[i].decode()}
