"""Data-loading throughput: decode + augment images/s per worker at 256x256 from WebDataset shards.

    python -m flowmo.bench.data                      # ImageNet-like shards built from scikit-image photos
    python -m flowmo.bench.data --shards data/imagenet/train.json --workers 8

Both training samplers are timed: `indexed` (random reads through the shard index, whole micro-batches; the
default for local shards) and `stream` (sequential shard reads + shuffle buffer; remote shards). One
DataLoader worker runs exactly the loop measured in this process (read, JPEG decode, Resize + RandomCrop, to
float tensor), so that figure is the per-worker throughput. It also times building the shard index by walking
the tar headers, and prints how many workers one GPU needs for FlowMo-Lo pre-training (method §9:
~0.6-0.7 s per step of 128 on 8 GPUs).
"""

from __future__ import annotations

import argparse
import math
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flowmo.data.datamodule import resolve_shards
from flowmo.data.index import build_index
from flowmo.data.indexed import IndexedBatches
from flowmo.data.sample_set import TRAIN_PHOTOS, VAL_PHOTOS, photo_path
from flowmo.data.shards import write_shards
from flowmo.data.stream import ShardStream, collate

# ImageNet train JPEGs: typically ~500x375 (or 375x500, 500x333), quality around 90, ~110 KB on average.
IMAGENET_LIKE_SIZES = ((500, 375), (375, 500), (500, 333), (500, 400), (400, 400), (500, 500))
LO_IMAGES_PER_GPU_STEP = 128 / 8
GRAIN_SIGMA = 18.0
LO_SECONDS_PER_STEP = (0.6, 0.7)


def build_imagenet_like_shards(folder: Path, count: int, seed: int = 0) -> str:
    """`count` JPEGs at ImageNet-typical sizes cut from the sample photographs, written as train shards."""
    rng, noise = random.Random(seed), np.random.default_rng(seed)
    photos = [Image.open(photo_path(name)).convert("RGB") for name in TRAIN_PHOTOS + VAL_PHOTOS]
    images = folder / "images" / "photos"
    images.mkdir(parents=True)
    for index in range(count):
        photo = photos[index % len(photos)]
        width, height = rng.choice(IMAGENET_LIKE_SIZES)
        scale = max(width / photo.width, height / photo.height) * rng.uniform(1.0, 1.5)
        resized = photo.resize((math.ceil(photo.width * scale), math.ceil(photo.height * scale)), Image.BILINEAR)
        left, top = rng.randint(0, resized.width - width), rng.randint(0, resized.height - height)
        crop = np.asarray(resized.crop((left, top, left + width, top + height)), dtype=np.float32)
        # Sensor-like grain: upscaled photos are smoother than camera JPEGs; this brings the bytes per image
        # (and so the entropy-decoding work) to ImageNet's level.
        grainy = np.clip(crop + noise.normal(0, GRAIN_SIGMA, crop.shape), 0, 255).astype(np.uint8)
        Image.fromarray(grainy).save(images / f"{index:05d}.jpg", quality=90)
    mean_kb = sum(path.stat().st_size for path in images.iterdir()) / count / 1024
    print(f"built {count} ImageNet-like JPEGs, {mean_kb:.0f} KB on average (ImageNet train: ~110 KB)")
    write_shards(folder / "images", folder / "shards", "train", shard_size=64, workers=1, progress=False)
    return str(folder / "shards" / "train.json")


def per_worker_rate(urls: list[str], image_size: int, count: int, shuffle_buffer: int) -> float:
    """images/s of one stream reader in this process: exactly what one DataLoader worker does."""
    stream = iter(ShardStream(urls, image_size, train=True, shuffle_buffer=shuffle_buffer))
    for _ in range(min(shuffle_buffer, count) + 8):  # warm up: fill the shuffle buffer, import lazily loaded code
        next(stream)
    start = time.perf_counter()
    for _ in range(count):
        next(stream)
    return count / (time.perf_counter() - start)


def indexed_per_worker_rate(batches: IndexedBatches, count: int) -> float:
    """images/s of one indexed reader in this process (whole micro-batches, as a worker makes them)."""
    reader = iter(batches)
    next(reader)  # warm up: import lazily loaded code, open the first files
    steps = max(1, count // batches.batch_size)
    start = time.perf_counter()
    for _ in range(steps):
        next(reader)
    return steps * batches.batch_size / (time.perf_counter() - start)


def loader_rate(loader: torch.utils.data.DataLoader, count: int, workers: int, batch_size: int) -> float:
    """images/s of a DataLoader with `workers` processes (startup excluded)."""
    batches = iter(loader)
    for _ in range(2 * workers):
        next(batches)
    steps = max(1, count // batch_size)
    start = time.perf_counter()
    for _ in range(steps):
        next(batches)
    return steps * batch_size / (time.perf_counter() - start)


def stream_loader(urls: list[str], image_size: int, workers: int, batch_size: int, buffer: int):
    stream = ShardStream(urls, image_size, train=True, shuffle_buffer=buffer)
    return torch.utils.data.DataLoader(stream, batch_size=batch_size, num_workers=workers, collate_fn=collate)


def indexed_loader(batches: IndexedBatches, workers: int):
    return torch.utils.data.DataLoader(batches, batch_size=None, num_workers=workers)


def report_workers_needed(rate: float) -> None:
    need = [LO_IMAGES_PER_GPU_STEP / seconds for seconds in LO_SECONDS_PER_STEP]
    print(
        f"FlowMo-Lo on 8 GPUs: {LO_IMAGES_PER_GPU_STEP:.0f} images/step/GPU at {LO_SECONDS_PER_STEP[0]}-"
        f"{LO_SECONDS_PER_STEP[1]} s/step -> {need[1]:.0f}-{need[0]:.0f} images/s per GPU"
    )
    workers = math.ceil(max(need) / rate)
    print(
        f"workers needed per H100: {workers} at {rate:.0f} images/s/worker "
        f"(use {max(2, 2 * workers)} for headroom: slower storage, larger JPEGs, Stage 1B evaluation)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", default=None, help="shard spec to read (default: build ImageNet-like shards)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--images", type=int, default=400, help="images timed per measurement")
    parser.add_argument("--workers", type=int, default=0, help="also time a DataLoader with this many workers")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shuffle-buffer", type=int, default=100)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a DataLoader worker runs single-threaded too
    with tempfile.TemporaryDirectory() as tmp:
        spec = args.shards or build_imagenet_like_shards(Path(tmp), count=max(256, args.images // 2))
        urls = resolve_shards(spec)
        started = time.perf_counter()
        index = build_index(urls)
        seconds = time.perf_counter() - started
        print(
            f"shard index by walking the tar headers: {len(index)} samples in {len(urls)} shards, {seconds:.2f} s "
            f"({seconds / max(1, len(index)) * 1e6:.0f} us per sample, page cache warm)"
        )
        batches = IndexedBatches(index, args.image_size, args.batch_size)
        rates = {
            "stream": per_worker_rate(urls, args.image_size, args.images, args.shuffle_buffer),
            "indexed": indexed_per_worker_rate(batches, args.images),
        }
        for sampler, rate in rates.items():
            print(
                f"{sampler:>7}: decode + Resize/RandomCrop {args.image_size}x{args.image_size} + to tensor: "
                f"{rate:.0f} images/s per worker ({len(urls)} shards of {args.shards or 'ImageNet-like JPEGs'})"
            )
        if args.workers > 0:
            loaders = {
                "stream": stream_loader(urls, args.image_size, args.workers, args.batch_size, args.shuffle_buffer),
                "indexed": indexed_loader(batches, args.workers),
            }
            for sampler, loader in loaders.items():
                total = loader_rate(loader, args.images, args.workers, args.batch_size)
                print(
                    f"{sampler:>7}: DataLoader with {args.workers} workers: {total:.0f} images/s "
                    f"({total / args.workers:.0f} per worker)"
                )
        report_workers_needed(rates["indexed"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
