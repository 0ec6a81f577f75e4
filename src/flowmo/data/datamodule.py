"""FlowMoDataModule: WebDataset shards -> batches `{"image", "cls", "key"}` for training and evaluation.

Shard paths (`train_shards`, `val_shards`, `test_shards`) may be
  - a manifest written by `flowmo shards` (`data/imagenet/train.json`): the shard list comes from it;
  - a local glob or brace pattern (`data/imagenet/train-*.tar`, `data/x/val-{000000..000049}.tar`);
  - anything WebDataset opens: URLs with brace patterns, `pipe:` commands (e.g. S3 through
    `pipe:aws s3 cp s3://bucket/train-{000000..001281}.tar -`), several patterns joined by `::`.
Local paths are checked at setup; remote ones are trusted.

Training data is infinite (drawn with replacement), so train with `max_steps` and an integer `val_check_interval`
with `check_val_every_n_epoch: null`. Local shards are read by index (flowmo.data.index, flowmo.data.indexed):
micro-batch m of rank r depends only on (seed, r, m), so a resumed run replays the uninterrupted one bit for bit.
Remote and `pipe:` shards cannot be read by index and are streamed (flowmo.data.stream): a resumed run is a correct
continuation, not a replay. Validation covers each sample exactly once across ranks and workers; ranks may then get
unequal batch counts, so per-step `sync_dist` logging in validation must be avoided (torchmetrics states, synced at
epoch end, are fine).
"""

from __future__ import annotations

import glob
import json
import math
import sys
from pathlib import Path
from typing import Literal, get_args

import lightning as L
import torch
from torch.utils.data import DataLoader
from webdataset.shardlists import expand_urls

from flowmo.data.index import ShardIndex, index_for
from flowmo.data.indexed import IndexedBatches
from flowmo.data.stream import ShardStream, SkipCounter, collate
from flowmo.errors import UserError

TrainSampler = Literal["auto", "indexed", "stream"]
TRAIN_SAMPLERS = get_args(TrainSampler)

HOW_TO_MAKE_SHARDS = (
    "make them from a folder of your images with `flowmo shards --source FOLDER --out data/my-photos "
    "--val-fraction 0.2` (then -c configs/data/folder.yaml, which reads data/my-photos; or --data.train_shards "
    "OUT/train.json --data.val_shards OUT/val.json), from ImageNet with `make shards IMAGENET=/path/to/ILSVRC2012`, "
    "or `make sample-data` (the embedded sample images, in data/sample)"
)


def resolve_shards(spec: str) -> list[str]:
    """A shard spec (manifest, local glob/brace pattern, or remote URL pattern) -> list of shard URLs."""
    if _is_remote(spec):
        return expand_urls(spec)
    if spec.endswith(".json"):
        return _manifest_shards(Path(spec))
    urls = sorted({path for pattern in expand_urls(spec) for path in glob.glob(pattern)})
    missing = [pattern for pattern in expand_urls(spec) if not glob.has_magic(pattern) and not Path(pattern).exists()]
    if not urls or missing:
        raise FileNotFoundError(f"No shards found at {(missing or [spec])[0]!r}: {HOW_TO_MAKE_SHARDS}.")
    return urls


def _is_remote(spec: str) -> bool:
    return spec.startswith("pipe:") or "://" in spec.split("::")[0]


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _manifest_shards(manifest_path: Path) -> list[str]:
    if not manifest_path.is_file():
        raise FileNotFoundError(f"No shard manifest at {str(manifest_path)!r}: {HOW_TO_MAKE_SHARDS}.")
    manifest = json.loads(manifest_path.read_text())
    urls = [str(manifest_path.parent / shard["url"]) for shard in manifest["shards"]]
    missing = [url for url in urls if not Path(url).exists()]
    if missing:
        listed_in = str(manifest_path)
        raise FileNotFoundError(f"Shard {missing[0]!r} listed in {listed_in!r} is missing: {HOW_TO_MAKE_SHARDS}.")
    if manifest.get("num_samples", 1) == 0:  # an infinite train stream over empty shards would never yield
        raise FileNotFoundError(f"{str(manifest_path)!r} lists no readable samples: {HOW_TO_MAKE_SHARDS}.")
    return urls


class FlowMoDataModule(L.LightningDataModule):
    """WebDataset shards for FlowMo (method §6).

    Args:
        train_shards: shard spec of the train split (see module docstring); None disables training data.
        val_shards: shard spec of the validation split.
        test_shards: shard spec of the test split; None reuses val_shards.
        image_size: side of the square crops (Resize shorter side + Random/CenterCrop).
        batch_size: train batch size per device.
        val_batch_size: eval batch size per device; None reuses batch_size.
        test_batch_size: test batch size per device; None reuses val_batch_size. Its own key so that the
            evaluation protocol (configs/eval/paper.yaml: 5, which `psnr_paper` needs) survives a data config
            stacked after it.
        num_workers: DataLoader worker processes per device (0 reads in the main process).
        pin_memory: page-locked host batches (only when CUDA is available).
        persistent_workers: keep workers alive between epochs / validation runs (only when num_workers > 0).
        random_flip: random horizontal flip in training (the paper uses none).
        train_sampler: how training samples are drawn. `indexed`: by number through an index of the local
            shards (`train.index.npz` beside the manifest; built and cached when missing), so micro-batch m of
            rank r depends only on (seed, r, m) and a resumed run replays the uninterrupted one bit for bit.
            `stream`: shards drawn at random and read through a shuffle buffer; the only way to read remote
            or `pipe:` shards; a resumed run continues correctly but sees other images. `auto` (default):
            indexed for local shards, stream for remote ones.
        shuffle_buffer: samples held by each worker's shuffle buffer in training (`stream` sampler only).
        val_max_samples: cap validation/test at about this many samples in total (each at most once).
        test_subsample: test on every N-th image of the test split only (1 = all): a quick, deterministic look
            (`make eval-lo SUBSAMPLE=10` = 5k of the 50k val images). rFID is biased upward with fewer images,
            so compare subsampled numbers only with each other, never with the paper's 50k ones.
        seed: base seed of the training draws; each rank derives its own from it.
    """

    def __init__(
        self,
        train_shards: str | None = None,
        val_shards: str | None = None,
        test_shards: str | None = None,
        image_size: int = 256,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        test_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        random_flip: bool = False,
        train_sampler: TrainSampler = "auto",
        shuffle_buffer: int = 1000,
        val_max_samples: int | None = None,
        test_subsample: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if image_size < 1 or batch_size < 1:
            raise UserError(f"image_size and batch_size must be >= 1, got {image_size} and {batch_size}")
        if test_subsample < 1:
            raise UserError(f"test_subsample must be >= 1 (evaluate every N-th test image), got {test_subsample}")
        if train_sampler not in TRAIN_SAMPLERS:
            raise UserError(f"data.train_sampler must be one of {', '.join(TRAIN_SAMPLERS)}, got {train_sampler!r}.")
        self.save_hyperparameters()
        self._skip_counter: SkipCounter | None = None  # created with the first loader (shared with its workers)
        self._train_index: ShardIndex | None = None  # built or read once, at the first indexed train loader
        self._warned_stream = False

    @property
    def skipped_samples(self) -> int:
        """Corrupt or unreadable samples skipped so far by this process's loaders (log it as a metric)."""
        return 0 if self._skip_counter is None else self._skip_counter.value

    def setup(self, stage: str | None = None) -> None:
        """Check local shard paths early, so a missing path fails before any model work."""
        for split in self._splits_for(stage):
            self._shard_urls(split)

    def train_dataloader(self) -> DataLoader:
        if self.resolved_train_sampler() == "stream":
            self._warn_stream_once()
            return self._loader("train", train=True, batch_size=self.hparams.batch_size)
        return self._indexed_loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False, batch_size=self.hparams.val_batch_size or self.hparams.batch_size)

    def test_dataloader(self) -> DataLoader:
        hp = self.hparams
        return self._loader("test", train=False, batch_size=hp.test_batch_size or hp.val_batch_size or hp.batch_size)

    def _splits_for(self, stage: str | None) -> list[str]:
        splits = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": []}
        return splits.get(stage, ["train", "val", "test"]) if stage else ["train", "val", "test"]

    def _shard_spec(self, split: str) -> str | None:
        hp = self.hparams
        return {"train": hp.train_shards, "val": hp.val_shards, "test": hp.test_shards or hp.val_shards}[split]

    def _shard_urls(self, split: str) -> list[str]:
        spec = self._shard_spec(split)
        if spec is None:
            unset = f"data.{split}_shards is null"
            raise FileNotFoundError(f"No {split} shards configured ({unset}): {HOW_TO_MAKE_SHARDS}.")
        return resolve_shards(spec)

    def _shard_offsets(self, split: str) -> dict[str, int] | None:
        """{shard url: index of its first sample in the split} from a manifest's counts (None otherwise)."""
        spec = self._shard_spec(split)
        if spec is None or _is_remote(spec) or not spec.endswith(".json"):
            return None
        manifest_path = Path(spec)
        offsets, start = {}, 0
        for shard in json.loads(manifest_path.read_text())["shards"]:
            offsets[str(manifest_path.parent / shard["url"])] = start
            start += shard["num_samples"]
        return offsets

    def expected_images(self, split: str = "test") -> int | None:
        """Images an exact-once pass over `split` should yield, from its manifest (None when unknown): what a
        report compares with the images actually read, so a truncated shard shows as images lost."""
        offsets = self._shard_offsets(split)
        if offsets is None or self.hparams.val_max_samples is not None:
            return None
        manifest = json.loads(Path(self._shard_spec(split)).read_text())
        total = sum(shard["num_samples"] for shard in manifest["shards"])
        every = self.hparams.test_subsample if split == "test" else 1
        return math.ceil(total / every)

    def resolved_train_sampler(self) -> str:
        """`indexed` or `stream`: what `train_sampler` (auto, indexed, stream) means for these train shards."""
        chosen, spec = self.hparams.train_sampler, self._shard_spec("train")
        remote = spec is not None and _is_remote(spec)
        if chosen == "indexed" and remote:
            raise UserError(
                f"data.train_sampler indexed needs local shard files, but {spec!r} is remote; copy the "
                "shards to local storage or use data.train_sampler stream (resume is then not bit-exact)."
            )
        if chosen == "auto":
            return "stream" if remote else "indexed"
        return chosen

    def _warn_stream_once(self) -> None:
        rank, *_ = self._trainer_position()
        if self._warned_stream or rank not in (None, 0):
            return
        self._warned_stream = True
        why = (
            "remote shards cannot be read by index"
            if self.hparams.train_sampler == "auto"
            else "data.train_sampler stream"
        )
        print(
            f"flowmo: training shards are streamed ({why}): a resumed run continues correctly but does not replay "
            "the uninterrupted run's images bit for bit (local shards with data.train_sampler auto or indexed do).",
            file=sys.stderr,
        )

    def _shared_skip_counter(self) -> SkipCounter:
        if self._skip_counter is None:  # created in the main process, before the loader's workers start
            self._skip_counter = SkipCounter()
        return self._skip_counter

    def _trainer_position(self) -> tuple[int | None, int | None, int, int]:
        """(rank, world size, global step, accumulate_grad_batches); without a Trainer, the readers take
        RANK/WORLD_SIZE themselves and start at step 0."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return None, None, 0, 1
        return trainer.global_rank, trainer.world_size, trainer.global_step, trainer.accumulate_grad_batches

    def train_index(self) -> ShardIndex:
        """The index of the train shards (read from beside the manifest, or built and cached there once)."""
        if self._train_index is None:
            spec = self._shard_spec("train")
            manifest = spec if spec is not None and spec.endswith(".json") else None
            self._train_index = index_for(self._shard_urls("train"), manifest, report=_to_stderr)
        return self._train_index

    def _indexed_loader(self) -> DataLoader:
        """Whole micro-batches by number. The trainer's global step counts optimizer steps; the data counts
        micro-batches, so a run resumed at step k starts at micro-batch k x accumulate_grad_batches."""
        hp = self.hparams
        rank, _, step, accumulation = self._trainer_position()
        if step > 0 and rank in (None, 0):
            print(
                f"flowmo: training data resumes at micro-batch {step * accumulation} (step {step} x "
                f"accumulate_grad_batches {accumulation}), where the uninterrupted run would be.",
                file=sys.stderr,
            )
        batches = IndexedBatches(
            self.train_index(),
            hp.image_size,
            hp.batch_size,
            seed=hp.seed,
            start_batch=step * accumulation,
            rank=rank,
            random_flip=hp.random_flip,
            skip_counter=self._shared_skip_counter(),
        )
        return DataLoader(
            batches,
            batch_size=None,  # the dataset yields collated batches: every batch is full (drop_last, method §6)
            num_workers=hp.num_workers,
            pin_memory=hp.pin_memory and torch.cuda.is_available(),
            persistent_workers=hp.persistent_workers and hp.num_workers > 0,
        )

    def _loader(self, split: str, train: bool, batch_size: int) -> DataLoader:
        hp = self.hparams
        rank, world_size, step, _ = self._trainer_position()
        subsample = self.hparams.test_subsample if split == "test" else 1
        stream = ShardStream(
            self._shard_urls(split),
            hp.image_size,
            train=train,
            seed=hp.seed,
            shuffle_buffer=hp.shuffle_buffer,
            random_flip=hp.random_flip,
            max_samples=None if train else hp.val_max_samples,
            rank=rank,
            world_size=world_size,
            skip_counter=self._shared_skip_counter(),
            start_step=step,
            subsample=subsample,
            shard_offsets=self._shard_offsets(split) if subsample > 1 else None,
        )
        return DataLoader(
            stream,
            batch_size=batch_size,
            num_workers=hp.num_workers,
            collate_fn=collate,
            pin_memory=hp.pin_memory and torch.cuda.is_available(),
            persistent_workers=hp.persistent_workers and hp.num_workers > 0,
            drop_last=train,  # method §6: drop_last=True in training; eval keeps every sample
        )
