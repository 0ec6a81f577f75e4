"""`flowmo pretokenize`: encode every image of an image-shard split once into token shards.

    flowmo pretokenize --tokenizer lo --shards data/imagenet/train.json --out data/tokens-lo
    flowmo pretokenize ... --crops 4          # 4 random crops per image instead of the center crop

Input shard i becomes token shard `{split}-{i:06d}.tar` (format: flowmo.generate.tokens), written to a temp name
and renamed when complete, with a record under `.{split}-parts/`: a rerun skips finished shards. Corrupt images
are skipped, counted and listed in the manifest. The tokenizer runs with its EMA weights (what the paper
evaluates) in fp32 under Lightning predict: with `--devices 8` each rank encodes every 8th pending shard on its
own GPU, and rank 0 writes the manifest once all ranks are done.
"""

from __future__ import annotations

import json
import os
import random
import tarfile
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm
from webdataset.tariterators import tarfile_samples

from flowmo.data.datamodule import resolve_shards
from flowmo.data.shards import _add_member, _atomic_write_text, skip_reason
from flowmo.data.transforms import IMAGE_FIELDS, decode_rgb, train_transform, val_transform
from flowmo.errors import UserError
from flowmo.generate.tokens import TOKEN_MANIFEST_VERSION, encode_ids, smallest_dtype, tokenizer_record
from flowmo.tools import load_tokenizer


def parse_crops(crops: str) -> dict:
    """ "center" -> one center crop per image (evaluation's crop); "N" -> N random crops (training's crop)."""
    if crops == "center":
        return {"policy": "center", "count": 1}
    if crops.isdigit() and int(crops) >= 1:
        return {"policy": "random", "count": int(crops)}
    raise UserError(f"--crops must be 'center' or a number of random crops per image (e.g. 4), got {crops!r}.")


def image_crops(data: bytes, key: str, crops: dict, size: int, seed: int) -> list[tuple[str, torch.Tensor]]:
    """(sample key, [3, size, size] in [-1, 1]) per crop of one encoded image; raises on a corrupt image."""
    image = decode_rgb(data)
    if crops["policy"] == "center":
        return [(key, val_transform(image, size))]
    rng = random.Random(f"{seed}-{key}")  # per image: a resumed or re-ordered run draws the same crops
    return [(f"{key}-crop{index}", train_transform(image, size, rng)) for index in range(crops["count"])]


class ShardTokenizer:
    """Encodes one image shard into one token shard."""

    def __init__(self, tokenizer, crops: dict, size: int, seed: int, batch_size: int):
        self.tokenizer, self.crops, self.size, self.seed = tokenizer, crops, size, seed
        self.batch_size = batch_size
        self.dtype = smallest_dtype(tokenizer.quantizer.codebook_size)

    def samples(self, url: str, skipped: list) -> list[tuple[str, str, int, torch.Tensor]]:
        """(sample key, source key, class, image) of every readable image of the shard; others go to `skipped`."""
        unreadable = lambda error: skipped.append({"key": None, "reason": skip_reason(error)}) or True  # noqa: E731
        out = []
        for sample in tarfile_samples([{"url": url}], handler=unreadable):
            key = sample["__key__"]
            try:
                field = next(name for name in IMAGE_FIELDS if name in sample)
                label = int(sample["cls"]) if "cls" in sample else -1
                out += [
                    (crop_key, key, label, image)
                    for crop_key, image in image_crops(sample[field], key, self.crops, self.size, self.seed)
                ]
            except Exception as error:  # a corrupt image or label: skip it, count it, go on
                skipped.append({"key": key, "reason": skip_reason(error)})
        return out

    def write(self, url: str, out_path: Path, part_path: Path, bar: tqdm) -> dict:
        skipped: list = []
        samples = self.samples(url, skipped)
        tmp_path = out_path.with_name(out_path.name + ".tmp")
        with tarfile.open(tmp_path, "w") as tar:
            for start in range(0, len(samples), self.batch_size):
                chunk = samples[start : start + self.batch_size]
                images = torch.stack([image for *_, image in chunk]).to(self.tokenizer.decoder.img_in.weight.device)
                ids = self.tokenizer.tokenize(images).cpu().numpy().astype(self.dtype)
                for (key, source_key, label, _), row in zip(chunk, ids):
                    _add_member(tar, f"{key}.tokens.npy", encode_ids(row))
                    _add_member(tar, f"{key}.cls", str(label).encode())
                    _add_member(tar, f"{key}.src", source_key.encode())
                bar.update(len(chunk))
        record = {
            "url": out_path.name,
            "num_samples": len(samples),
            "skipped": skipped,
            "max_class": max((label for _, _, label, _ in samples), default=-1),
        }
        _atomic_write_text(part_path, json.dumps(record))
        os.replace(tmp_path, out_path)
        return record


class ShardPredictor(L.LightningModule):
    """Lightning predict over pending shards: one predict step encodes one whole shard on this rank's device."""

    def __init__(self, writer: ShardTokenizer, jobs: list[tuple[str, str, str]], progress: bool):
        super().__init__()
        self.tokenizer = writer.tokenizer  # a submodule, so Lightning moves it to this rank's device
        self.writer, self.jobs, self.progress = writer, jobs, progress
        self.bar: tqdm | None = None

    def predict_dataloader(self) -> DataLoader:
        mine = self.jobs[self.global_rank :: self.trainer.world_size]  # disjoint: no two ranks write one shard
        return DataLoader(mine or [()], batch_size=None)  # Lightning refuses an empty loader: one no-op job

    def on_predict_start(self) -> None:
        self.bar = tqdm(
            unit="img",
            desc=f"pretokenize (rank {self.global_rank})",
            disable=not self.progress,
            position=self.global_rank,
        )

    def predict_step(self, job: tuple[str, str, str] | tuple, batch_idx: int) -> int:
        if not job:
            return 0
        url, out_path, part_path = job
        return self.writer.write(url, Path(out_path), Path(part_path), self.bar)["num_samples"]

    def on_predict_end(self) -> None:
        self.bar.close()


def pretokenize(
    tokenizer_path: str,
    shards: str,
    out_dir: str | Path,
    split: str = "train",
    crops: str = "center",
    size: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    accelerator: str = "auto",
    devices: int | str = "auto",
    strategy: str = "auto",
    progress: bool = True,
) -> dict:
    """Write (or finish writing) the token shards of one split; returns the token manifest."""
    tokenizer = load_tokenizer(tokenizer_path, "cpu")
    crop_policy = {**parse_crops(crops), "seed": seed}
    size = size or tokenizer.config.image_size
    urls = _image_shards(shards)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = tokenizer_record(tokenizer, str(tokenizer_path))
    run = {
        "tokenizer_sha256": record["sha256"],
        "crops": crop_policy,
        "image_size": size,
        "source": str(Path(shards).resolve()),
    }
    parts_dir = _start_or_resume(out_dir, split, run)
    writer = ShardTokenizer(tokenizer, crop_policy, size, seed, batch_size)
    names = [f"{split}-{index:06d}.tar" for index in range(len(urls))]
    pending = [
        (url, str(out_dir / name), str(parts_dir / f"{name}.json"))
        for url, name in zip(urls, names)
        if not ((out_dir / name).exists() and (parts_dir / f"{name}.json").exists())
    ]  # skip finished shards
    is_global_zero = True
    if pending:
        trainer = L.Trainer(
            accelerator=accelerator,
            devices=devices,
            strategy=strategy,
            precision="32-true",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            use_distributed_sampler=False,
        )
        trainer.predict(ShardPredictor(writer, pending, progress), return_predictions=False)
        trainer.strategy.barrier()  # every rank's shards are written before the manifest counts them
        is_global_zero = trainer.is_global_zero
    manifest = _manifest(split, run, record, writer.dtype, shards, names, parts_dir)
    if is_global_zero:
        _atomic_write_text(out_dir / f"{split}.json", json.dumps(manifest, indent=1))
    return manifest


def _image_shards(shards: str) -> list[str]:
    try:
        return resolve_shards(shards)
    except FileNotFoundError as error:
        raise UserError(str(error)) from None


def _start_or_resume(out_dir: Path, split: str, run: dict) -> Path:
    """The per-shard record folder; refuses to finish a run begun with another tokenizer or crop policy."""
    parts_dir = out_dir / f".{split}-parts"
    run_file = parts_dir / "run.json"
    if run_file.exists() and json.loads(run_file.read_text()) != run:
        raise UserError(
            f"{out_dir} holds {split!r} token shards of another tokenizer, crop policy or source "
            f"({run_file.read_text()}); write to a new --out folder or delete that one."
        )
    parts_dir.mkdir(exist_ok=True)
    _atomic_write_text(run_file, json.dumps(run))
    for stale in out_dir.glob(f"{split}-*.tar.tmp"):  # left by an interrupted run; rewritten
        stale.unlink()
    return parts_dir


def _manifest(split: str, run: dict, record: dict, dtype, shards: str, names: list[str], parts_dir: Path) -> dict:
    parts = [json.loads((parts_dir / f"{name}.json").read_text()) for name in names]
    skipped = [entry for part in parts for entry in part["skipped"]]
    source = json.loads(Path(shards).read_text()) if shards.endswith(".json") else {}
    classes = source.get("classes") or []
    return {
        "version": TOKEN_MANIFEST_VERSION,
        "split": split,
        "num_samples": sum(part["num_samples"] for part in parts),
        "num_shards": len(parts),
        "shards": [{"url": part["url"], "num_samples": part["num_samples"]} for part in parts],
        "num_classes": max(len(classes), 1 + max((part["max_class"] for part in parts), default=-1)),
        "classes": classes,
        "tokens_dtype": dtype.name,
        "tokenizer": record,
        "crops": run["crops"],
        "image_size": run["image_size"],
        "source": run["source"],
        "num_skipped": len(skipped),
        "skipped": skipped,
    }
