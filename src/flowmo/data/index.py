"""An index of local shards for random access: per sample, the shard, the byte offset and size of its image
member, its class and its key.

Training reads samples by number through it (flowmo.data.indexed), which is what lets a resumed run draw
exactly the images the uninterrupted run would have drawn. It is built by walking the tar headers: TarFile
reads a header, records where the member's data starts, and seeks past the data, so only headers and the few
bytes of each `.cls` member are read. `flowmo shards` writes it beside the manifest (`train.index.npz` next to
`train.json`) while each shard is still in the page cache; a DataModule that finds it missing or stale (a
shard's size or modification time changed) rebuilds it and caches it there when the folder is writable.

A sample is a run of consecutive members sharing a key, grouped like webdataset does (key = the path up to
the first dot of the file name). Samples without an image member are left out; an unparseable label is kept
as BAD_LABEL, so the reader counts that sample as corrupt, like the stream does.
"""

from __future__ import annotations

import os
import re
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowmo.data.transforms import IMAGE_FIELDS

INDEX_VERSION = 1
NO_LABEL = -1
BAD_LABEL = -2  # a `.cls` member that is not an integer: the sample is skipped and counted when drawn
MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key / field split


@dataclass
class ShardEntries:
    """The samples of one shard, and the shard's (size, mtime_ns) when it was walked."""

    keys: list[str]
    offsets: list[int]
    sizes: list[int]
    labels: list[int]
    stamp: tuple[int, int]

    def to_json(self) -> dict:
        return {
            "keys": self.keys,
            "offsets": self.offsets,
            "sizes": self.sizes,
            "labels": self.labels,
            "stamp": list(self.stamp),
        }

    @classmethod
    def from_json(cls, record: dict) -> ShardEntries:
        return cls(record["keys"], record["offsets"], record["sizes"], record["labels"], tuple(record["stamp"]))


@dataclass
class ShardIndex:
    """Sample i lives in shards[shard[i]], its image bytes at [offset[i], offset[i] + size[i])."""

    shards: list[str]
    stamps: np.ndarray  # int64 [S, 2]: each shard's size and mtime_ns when indexed
    shard: np.ndarray  # int32 [N]
    offset: np.ndarray  # int64 [N]
    size: np.ndarray  # int64 [N]
    label: np.ndarray  # int32 [N]: class index, NO_LABEL or BAD_LABEL
    key: np.ndarray  # bytes [N]: UTF-8 sample keys

    def __len__(self) -> int:
        return len(self.offset)

    @classmethod
    def from_entries(cls, shards: list[str], entries: list[ShardEntries]) -> ShardIndex:
        counts = [len(e.offsets) for e in entries]
        return cls(
            shards=list(shards),
            stamps=np.array([e.stamp for e in entries], dtype=np.int64).reshape(-1, 2),
            shard=np.repeat(np.arange(len(entries), dtype=np.int32), counts),
            offset=np.array([o for e in entries for o in e.offsets], dtype=np.int64),
            size=np.array([s for e in entries for s in e.sizes], dtype=np.int64),
            label=np.array([c for e in entries for c in e.labels], dtype=np.int32),
            key=np.array([k.encode() for e in entries for k in e.keys], dtype=np.bytes_),
        )


def shard_stamp(path: str | Path) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


def index_shard(path: str | Path) -> ShardEntries:
    """Walk one shard's tar headers. A shard that is not a tar (or is cut inside its first header) gives no
    samples; a member cut short keeps its entry and fails when read, where it is counted."""
    entries = ShardEntries([], [], [], [], shard_stamp(path))  # stamped first: a change while walking shows later
    try:
        with tarfile.open(path, mode="r:") as tar:
            for key, members in _samples(tar):
                _add_sample(tar, key, members, entries)
    except (tarfile.TarError, OSError) as error:
        print(f"flowmo: {path} could not be indexed past {len(entries.keys)} samples ({error}).", file=sys.stderr)
    return entries


def _samples(tar: tarfile.TarFile):
    """(key, {field: member}) for each run of consecutive members sharing a key."""
    key, members = None, {}
    for member in tar:
        match = MEMBER_NAME.match(member.name)
        if not member.isfile() or match is None:
            continue
        member_key, field = match.group(1), match.group(2).lower()
        if member_key != key or field in members:
            if members:
                yield key, members
            key, members = member_key, {}
        members[field] = member
    if members:
        yield key, members


def _add_sample(tar: tarfile.TarFile, key: str, members: dict, entries: ShardEntries) -> None:
    image = next((members[field] for field in IMAGE_FIELDS if field in members), None)
    if image is None:
        return
    label = NO_LABEL
    if "cls" in members:
        try:
            label = int(tar.extractfile(members["cls"]).read())
        except ValueError:
            label = BAD_LABEL
    entries.keys.append(key)
    entries.offsets.append(image.offset_data)
    entries.sizes.append(image.size)
    entries.labels.append(label)


def sidecar_path(manifest_path: str | Path) -> Path:
    """`data/imagenet/train.json` -> `data/imagenet/train.index.npz`."""
    manifest_path = Path(manifest_path)
    return manifest_path.with_name(manifest_path.stem + ".index.npz")


def save_index(index: ShardIndex, path: Path) -> None:
    """Write atomically (a temporary file renamed over the target): ranks that build it at once never tear it.
    Shard paths are stored relative to the file's folder, so a moved dataset folder keeps its index."""
    names = np.array([os.path.relpath(shard, path.parent) for shard in index.shards], dtype=np.str_)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "wb") as handle:
        np.savez(
            handle,
            version=np.int64(INDEX_VERSION),
            shards=names,
            stamps=index.stamps,
            shard=index.shard,
            offset=index.offset,
            size=index.size,
            label=index.label,
            key=index.key,
        )
    os.replace(temporary, path)


def load_index(path: Path, shards: list[str]) -> ShardIndex | None:
    """The saved index of exactly these shards, or None when it is missing, of another version or stale."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            arrays = {name: saved[name] for name in saved.files}
    except (OSError, ValueError, KeyError):
        return None
    names = [os.path.relpath(shard, path.parent) for shard in shards]
    if int(arrays.get("version", -1)) != INDEX_VERSION or arrays["shards"].tolist() != names:
        return None
    try:
        current = np.array([shard_stamp(shard) for shard in shards], dtype=np.int64).reshape(-1, 2)
    except OSError:
        return None
    if not np.array_equal(current, arrays["stamps"]):
        return None
    return ShardIndex(
        list(shards),
        arrays["stamps"],
        arrays["shard"],
        arrays["offset"],
        arrays["size"],
        arrays["label"],
        arrays["key"],
    )


def build_index(shards: list[str], report: Callable[[str], None] | None = None) -> ShardIndex:
    started = time.perf_counter()
    index = ShardIndex.from_entries(shards, [index_shard(shard) for shard in shards])
    if report is not None:
        report(f"flowmo: indexed {len(index)} samples in {len(shards)} shards in {time.perf_counter() - started:.1f} s")
    return index


def index_for(
    shards: list[str], manifest_path: str | Path | None = None, report: Callable[[str], None] | None = None
) -> ShardIndex:
    """The index of `shards`: read from the manifest's sidecar when it is current, else built by walking the
    shards and saved there (kept in memory only when there is no manifest or its folder is read-only)."""
    path = sidecar_path(manifest_path) if manifest_path is not None else None
    if path is not None and path.is_file():
        index = load_index(path, shards)
        if index is not None:
            return index
    index = build_index(shards, report)
    if path is not None:
        try:
            save_index(index, path)
        except OSError as error:
            if report is not None:
                report(f"flowmo: could not cache the index at {path} ({error}); it is kept in memory.")
    return index
