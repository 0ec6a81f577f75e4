"""Shard writer: `flowmo shards --source PATH --out DIR --split NAME` (design: WebDataset shards), or
`--val-fraction F` for train and val splits of one folder (`write_split_shards`).

Output in DIR:
  {split}-000000.tar, ...   samples `{key}.jpg` (original bytes, never re-encoded; a non-JPEG source file keeps
                            its own format and extension, e.g. `.png`) + `{key}.cls` (class index as text)
  {split}.json              manifest: sample count, shard list with counts, classes, skipped files with reasons
  {split}.index.npz         per sample: shard, byte offset and size of the image, class, key (flowmo.data.index),
                            what training reads samples by number through (bit-exact resume)

Resumable: shard i always holds the same items (a fixed order cut into fixed-size slices), each shard is written
to `*.tar.tmp` and renamed only when complete, and a per-shard record under `.{split}-parts/` says it is done. A
rerun after an interruption skips finished shards and rewrites the rest; a reader globbing `*.tar` never sees a
half-written file. Unreadable or corrupt images are skipped and listed in the manifest, never fatal.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import sys
import tarfile
from multiprocessing import Pool
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from flowmo.data.index import ShardEntries, ShardIndex, index_for, index_shard, save_index, sidecar_path
from flowmo.data.sources import SourceItem, SourceListing, close_descriptors, list_source, read_item_bytes

# PIL format name -> shard field; JPEG is the normal case, the others keep their bytes under their own extension.
FIELD_FOR_FORMAT = {
    "JPEG": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "GIF": "gif",
    "BMP": "bmp",
    "TIFF": "tiff",
    "PPM": "ppm",
}
MANIFEST_VERSION = 1

_tar_descriptors: dict = {}  # per process: open source tars, read with pread (see read_item_bytes)


def write_shards(
    source: str | Path,
    out_dir: str | Path,
    split: str,
    shard_size: int = 1000,
    workers: int | None = None,
    val_labels: str | Path | None = None,
    shuffle: bool | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Write (or finish writing) the shards of one split and return its manifest.

    `shuffle` (default: on for splits named train*) permutes the items once with `seed` before cutting shards,
    so a shard mixes classes and a small shuffle buffer suffices; other splits keep sorted-key order (the val
    index is sorted by basename, method §6).
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if progress:  # indexing the 1.28M-image train tar reads every tar header: say what is happening
        print(f"indexing {source} ...", file=sys.stderr, flush=True)
    listing = list_source(source, val_labels)
    run = {"source": str(Path(source).resolve())}
    return _write_listing(listing, run, out_dir, split, shard_size, workers, shuffle, seed, progress)


def write_split_shards(
    source: str | Path,
    out_dir: str | Path,
    val_fraction: float,
    shard_size: int = 1000,
    workers: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, dict]:
    """Train and val shards of one image folder: {"train": manifest, "val": manifest}. The split is
    `split_listing`'s (deterministic, stratified by class folder); the files the listing skipped are in train.json."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    listing = list_source(source)
    parts = split_listing(listing, val_fraction, seed)
    run = {"source": str(Path(source).resolve()), "val_fraction": val_fraction}
    return {
        split: _write_listing(part, run, out_dir, split, shard_size, workers, None, seed, progress)
        for split, part in parts.items()
    }


def split_listing(listing: SourceListing, val_fraction: float, seed: int = 0) -> dict[str, SourceListing]:
    """{"train", "val"} listings: within each class (the top-level folder; one class for a flat folder) a
    round(val_fraction x n) of its images, drawn by a generator seeded with (seed, class), go to val. The same folder,
    fraction and seed always give the same split, whatever order the files were listed or written in."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction must be between 0 and 1 (e.g. 0.2), got {val_fraction}")
    by_class: dict[int, list[SourceItem]] = {}
    for item in sorted(listing.items, key=lambda it: it.key):
        by_class.setdefault(item.cls, []).append(item)
    val_keys = set()
    for cls, items in by_class.items():
        chosen = random.Random(f"{seed}:{cls}").sample(items, round(val_fraction * len(items)))
        val_keys.update(item.key for item in chosen)
    val = [item for item in listing.items if item.key in val_keys]
    train = [item for item in listing.items if item.key not in val_keys]
    if not val or not train:
        raise ValueError(
            f"--val-fraction {val_fraction} of {len(listing.items)} images leaves "
            f"{'no validation' if not val else 'no training'} image; choose a fraction that leaves both"
        )
    return {
        "train": SourceListing(train, listing.class_names, listing.skipped),
        "val": SourceListing(val, listing.class_names, []),
    }


def _write_listing(
    listing: SourceListing,
    run: dict,
    out_dir: str | Path,
    split: str,
    shard_size: int,
    workers: int | None,
    shuffle: bool | None,
    seed: int,
    progress: bool,
) -> dict:
    """Write (or finish writing) the shards of one split's listing and return its manifest."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shuffle = split.startswith("train") if shuffle is None else shuffle
    items = list(listing.items)
    if shuffle:
        random.Random(seed).shuffle(items)
    run = {**run, "num_items": len(items), "shard_size": shard_size, "shuffle": shuffle, "seed": seed}
    manifest_path = out_dir / f"{split}.json"
    if _finished(manifest_path, run, out_dir):
        manifest = json.loads(manifest_path.read_text())
        index_for([str(out_dir / shard["url"]) for shard in manifest["shards"]], manifest_path)  # if missing or stale
        return manifest
    parts_dir = _start_or_resume(out_dir, split, run)
    chunks = [items[i : i + shard_size] for i in range(0, len(items), shard_size)]
    names = [f"{split}-{index:06d}.tar" for index in range(len(chunks))]
    tasks = [(str(out_dir / name), str(parts_dir / f"{name}.json"), chunk) for name, chunk in zip(names, chunks)]
    pending = [task for task in tasks if not (Path(task[0]).exists() and Path(task[1]).exists())]
    try:
        _run_tasks(pending, workers, progress, desc=f"shards {split}")
    finally:
        close_descriptors(_tar_descriptors)  # opened here when the shards were written in this process
    records = [json.loads((parts_dir / f"{name}.json").read_text()) for name in names]
    manifest = _manifest(split, run, listing, records)
    _save_index(out_dir, records, sidecar_path(manifest_path))  # first: a manifest always has its index beside it
    _atomic_write_text(manifest_path, json.dumps(manifest, indent=1))
    shutil.rmtree(parts_dir)
    return manifest


def _finished(manifest_path: Path, run: dict, out_dir: Path) -> bool:
    if not manifest_path.exists():
        return False
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("run") != run:
        raise ValueError(
            f"{manifest_path} was written from a different source or settings ({manifest.get('run')}); "
            "write to a new --out directory or delete the old shards first"
        )
    return all((out_dir / shard["url"]).exists() for shard in manifest["shards"])


def _start_or_resume(out_dir: Path, split: str, run: dict) -> Path:
    """The per-shard record folder; refuses to mix a resumed run with different settings."""
    parts_dir = out_dir / f".{split}-parts"
    run_file = parts_dir / "run.json"
    if run_file.exists() and json.loads(run_file.read_text()) != run:
        raise ValueError(
            f"{out_dir} holds an unfinished {split!r} run with other settings ({run_file.read_text()}); "
            f"rerun with the same --source/--shard-size, or delete {parts_dir} and the {split}-*.tar files"
        )
    parts_dir.mkdir(exist_ok=True)
    _atomic_write_text(run_file, json.dumps(run))
    for stale in out_dir.glob(f"{split}-*.tar.tmp"):  # left by an interrupted run; rewritten below
        stale.unlink()
    return parts_dir


def _run_tasks(tasks: list, workers: int | None, progress: bool, desc: str) -> None:
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks) or 1))
    total = sum(len(task[2]) for task in tasks)
    with tqdm(total=total, unit="img", desc=desc, disable=not progress) as bar:
        if workers == 1:
            for task in tasks:
                bar.update(write_one_shard(task))
            return
        with Pool(workers) as pool:
            for done in pool.imap_unordered(write_one_shard, tasks):
                bar.update(done)


def write_one_shard(task: tuple[str, str, list[SourceItem]]) -> int:
    """Write one shard to a temp name, record it, then rename; returns the number of items handled."""
    shard_path, part_path, items = task
    tmp_path = shard_path + ".tmp"
    written, skipped = 0, []
    with tarfile.open(tmp_path, "w") as tar:
        for item in items:
            try:
                data = read_item_bytes(item, _tar_descriptors)
                field = check_image(data)
            except Exception as error:  # any unreadable or undecodable image is skipped, never fatal
                skipped.append({"key": item.key, "path": _describe(item), "reason": skip_reason(error)})
                continue
            _add_member(tar, f"{item.key}.{field}", data)
            _add_member(tar, f"{item.key}.cls", str(item.cls).encode())
            written += 1
    # indexed now, while the shard is still in the page cache (a later walk over 140 GB would read from disk)
    record = {
        "url": Path(shard_path).name,
        "num_samples": written,
        "skipped": skipped,
        "index": index_shard(tmp_path).to_json(),
    }
    _atomic_write_text(Path(part_path), json.dumps(record))
    os.replace(tmp_path, shard_path)
    return len(items)


def check_image(data: bytes) -> str:
    """Decode the image fully (cheaply) and return its shard field; raises on corrupt or non-image bytes.

    JPEG draft mode decodes at up to 1/8 scale in the DCT domain, which still walks all entropy-coded data, so
    truncation and corruption surface here at a fraction of the cost of a full decode.
    """
    with Image.open(io.BytesIO(data)) as image:
        field = FIELD_FOR_FORMAT.get(image.format)
        if field is None:
            raise ValueError(f"unsupported image format {image.format}")
        image.draft("RGB", (64, 64))
        image.load()
    return field


def skip_reason(error: Exception) -> str:
    """A stable one-line reason (PIL puts the BytesIO object's address in some messages)."""
    message = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(error))
    return f"{type(error).__name__}: {message}"


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o444
    info.mtime = 0  # byte-identical shards from identical inputs
    tar.addfile(info, io.BytesIO(data))


def _describe(item: SourceItem) -> str:
    return item.path if item.size < 0 else f"{item.path}@{item.offset}+{item.size}"


def _save_index(out_dir: Path, records: list[dict], path: Path) -> None:
    """The split's index from the shards' records (a record of an older writer without one: walk that shard)."""
    shards = [str(out_dir / record["url"]) for record in records]
    entries = [
        ShardEntries.from_json(record["index"]) if "index" in record else index_shard(shard)
        for record, shard in zip(records, shards)
    ]
    save_index(ShardIndex.from_entries(shards, entries), path)


def _manifest(split: str, run: dict, listing, records: list[dict]) -> dict:
    skipped = list(listing.skipped) + [entry for record in records for entry in record["skipped"]]
    return {
        "version": MANIFEST_VERSION,
        "split": split,
        "num_samples": sum(record["num_samples"] for record in records),
        "num_shards": len(records),
        "shards": [{"url": record["url"], "num_samples": record["num_samples"]} for record in records],
        "classes": listing.class_names,
        "num_skipped": len(skipped),
        "skipped": skipped,
        "run": run,
    }


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
