"""The sample stream read from WebDataset shards: an IterableDataset, usable with or without Lightning.

Train (the `stream` sampler: remote and `pipe:` shards, which cannot be read by index; local shards use
flowmo.data.indexed): every (rank, worker) draws shards at random with replacement, forever, from its own
seeded RNG (method §6: a per-rank sampler with replacement, ranks seeded differently), shuffles samples in
a buffer, and decodes + augments them. Where it stands depends on everything read before, so a resumed run is
reseeded by its start step: a correct continuation, not a replay of the uninterrupted run.
Eval: shards are split by rank, then by worker, and read in order, so across all ranks and workers each sample
is seen exactly once and the order is fixed.

Corrupt samples (and unreadable tar members) are skipped and counted in a counter shared with the DataLoader
workers, so the training module can log the count; they never stop the run.
"""

from __future__ import annotations

import math
import multiprocessing
import random
from collections.abc import Iterable, Iterator
from itertools import islice

import torch
from torch.utils.data import IterableDataset
from webdataset.tariterators import tarfile_samples
from webdataset.utils import pytorch_worker_info

from flowmo.data.transforms import IMAGE_FIELDS, decode_rgb, train_transform, val_transform

MAX_FAILURES_IN_A_ROW = 1000  # a few corrupt JPEGs are normal; a thousand in a row means wrong or broken shards


class SkipCounter:
    """A count shared by the main process and its DataLoader workers (shared memory, inherited at start)."""

    def __init__(self) -> None:
        self._value = multiprocessing.Value("q", 0)

    def add(self, n: int = 1) -> None:
        with self._value.get_lock():
            self._value.value += n

    @property
    def value(self) -> int:
        return int(self._value.value)


class ShardStream(IterableDataset):
    """Samples `{"image": float32 [3, S, S] in [-1, 1], "cls": int, "key": str}` from a list of shard URLs.

    `rank` / `world_size` are captured in the main process (e.g. from the Trainer) because DataLoader workers
    may not see the process group; left as None they come from RANK/WORLD_SIZE or torch.distributed.
    `start_step` (the trainer's global step when the loader is built) is mixed into the train seed.
    `subsample` N > 1 keeps every N-th evaluation sample (see `every_nth`; `shard_offsets` from the manifest).
    """

    def __init__(
        self,
        urls: list[str],
        image_size: int,
        train: bool,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        random_flip: bool = False,
        max_samples: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        skip_counter: SkipCounter | None = None,
        start_step: int = 0,
        subsample: int = 1,
        shard_offsets: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        if not urls:
            raise ValueError("ShardStream needs at least one shard URL")
        self.urls = list(urls)
        self.image_size = image_size
        self.train = train
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.random_flip = random_flip
        self.max_samples = max_samples
        self.rank, self.world_size = rank, world_size
        self.skip_counter = skip_counter
        self.start_step = start_step
        if subsample < 1:
            raise ValueError(f"subsample must be >= 1 (every N-th evaluation image), got {subsample}.")
        self.subsample, self.shard_offsets = subsample, shard_offsets or {}

    def __iter__(self) -> Iterator[dict]:
        rank, world_size, worker, num_workers = reader_slot(self.rank, self.world_size)
        # str seeds hash deterministically; start_step makes a resumed run draw new data, not replay its start
        rng = random.Random(f"flowmo-data-{self.seed}-{self.start_step}-{rank}-{worker}")
        if self.train:
            progress = {"shards_without_sample": 0}
            samples = tarfile_samples(resampled_urls(self.urls, rng, progress), handler=self._skip_error)
            samples = _reset_on_sample(samples, progress)
            samples = buffer_shuffle(samples, self.shuffle_buffer, rng)
        else:
            my_urls = self.urls[rank::world_size][worker::num_workers]
            samples = tarfile_samples(({"url": url} for url in my_urls), handler=self._skip_error)
            if self.subsample > 1:
                samples = every_nth(samples, self.subsample, self.shard_offsets)
        decoded = self._decoded(samples, rng)
        if self.max_samples is not None and not self.train:
            # An even share per reader; about max_samples in total, still each at most once.
            decoded = islice(decoded, math.ceil(self.max_samples / (world_size * num_workers)))
        return iter(decoded)

    def _decoded(self, samples: Iterable[dict], rng: random.Random) -> Iterator[dict]:
        """Decoded samples; corrupt ones are dropped, but a stream where nothing decodes is an error, not a hang."""
        failures_in_a_row = 0
        for sample in samples:
            decoded = self._decode(sample, rng)
            if decoded is not None:
                failures_in_a_row = 0
                yield decoded
                continue
            failures_in_a_row += 1
            if failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
                raise RuntimeError(
                    f"{failures_in_a_row} samples in a row failed to decode (shards {self.urls[:2]}...): these are "
                    "not image shards written by `flowmo shards`, or they are badly damaged"
                )

    def _decode(self, sample: dict, rng: random.Random) -> dict | None:
        try:
            field = next(name for name in IMAGE_FIELDS if name in sample)
            image = decode_rgb(sample[field])
            if self.train:
                tensor = train_transform(image, self.image_size, rng, self.random_flip)
            else:
                tensor = val_transform(image, self.image_size)
            if not torch.isfinite(tensor).all():  # one NaN pixel would poison every weight within a step
                raise ValueError("non-finite pixel")
            cls = int(sample["cls"]) if "cls" in sample else -1
        except Exception:  # corrupt JPEG, missing image field, bad label: skip it, count it
            self._count_skip()
            return None
        return {"image": tensor, "cls": cls, "key": sample["__key__"]}

    def _skip_error(self, error: Exception) -> bool:
        """webdataset handler for unreadable shards/members: count and continue with the next one."""
        self._count_skip()
        return True

    def _count_skip(self) -> None:
        if self.skip_counter is not None:
            self.skip_counter.add()


def reader_slot(rank: int | None = None, world_size: int | None = None) -> tuple[int, int, int, int]:
    """(rank, world_size, worker, num_workers) of the code calling it; a rank given by the main process wins
    over RANK/WORLD_SIZE and torch.distributed (workers may not see the process group). Honours the
    WORKER/NUM_WORKERS environment variables (webdataset's hook)."""
    found_rank, found_world_size, worker, num_workers = pytorch_worker_info()
    if rank is not None:
        return rank, world_size or 1, worker, num_workers
    return found_rank, found_world_size, worker, num_workers


def every_nth(samples: Iterable[dict], n: int, shard_offsets: dict[str, int]) -> Iterator[dict]:
    """Evaluation samples whose index in the split is a multiple of n: a quick, deterministic subset.

    index = the shard's first index (`shard_offsets`, from the manifest's counts) + the position in the shard,
    so every rank and worker selects the same global subset however the shards are divided. Shards without a
    known offset (a glob or URL spec) count from 0: every N-th sample of each shard. Positions are counted
    before decoding, so a corrupt sample drops out without shifting the selection.
    """
    url, position = None, 0
    for sample in samples:
        if sample.get("__url__") != url:
            url, position = sample.get("__url__"), 0
        if (shard_offsets.get(url, 0) + position) % n == 0:
            yield sample
        position += 1


def resampled_urls(urls: list[str], rng: random.Random, progress: dict | None = None) -> Iterator[dict]:
    """Shards drawn uniformly with replacement, forever: an infinite train stream without epochs.

    With `progress` (reset by _reset_on_sample whenever a sample comes out), a stream that opens
    2 x len(urls) + 8 shards in a row without a single sample stops: every shard is empty or unreadable.
    """
    limit = 2 * len(urls) + 8
    while True:
        if progress is not None:
            if progress["shards_without_sample"] >= limit:
                shown = ", ".join(urls[:3]) + (f" and {len(urls) - 3} more" if len(urls) > 3 else "")
                raise RuntimeError(
                    f"the training shards yield no sample ({limit} shard reads in a row gave none): "
                    f"{shown}; check that the paths or the pipe: command produce WebDataset tars "
                    "of images (flowmo shards writes them)."
                )
            progress["shards_without_sample"] += 1
        yield {"url": rng.choice(urls)}


def _reset_on_sample(samples: Iterable[dict], progress: dict) -> Iterator[dict]:
    for sample in samples:
        progress["shards_without_sample"] = 0
        yield sample


def buffer_shuffle(samples: Iterable[dict], buffer_size: int, rng: random.Random) -> Iterator[dict]:
    """Shuffle a stream with a fixed-size buffer (samples are still encoded bytes here, so it stays cheap)."""
    if buffer_size <= 1:
        yield from samples
        return
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        index = rng.randrange(buffer_size)
        yield buffer[index]
        buffer[index] = sample
    rng.shuffle(buffer)
    yield from buffer


def collate(samples: list[dict]) -> dict:
    """List of samples -> {"image": [B, 3, S, S] float32, "cls": [B] int64, "key": list[str]}."""
    return {
        "image": torch.stack([sample["image"] for sample in samples]),
        "cls": torch.tensor([sample["cls"] for sample in samples], dtype=torch.int64),
        "key": [sample["key"] for sample in samples],
    }
