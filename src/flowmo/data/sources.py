"""Where shard samples come from: an ImageFolder-style directory tree or the original ILSVRC2012 tars.

Every source is turned into a sorted list of `SourceItem`s (key, class, where the bytes are). The shard writer
only ever reads bytes through `read_item_bytes`, so a directory of files and a 140 GB tar of per-class tars look
the same to it. Tars are indexed by reading tar headers only (seeking past the data), which is what makes the
ILSVRC2012 train tar usable without unpacking it (method §6: the inner JPEG bytes are contiguous inside the
outer tar, so an absolute offset + size is enough to read one image).
"""

from __future__ import annotations

import os
import tarfile
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from flowmo.data.transforms import IMAGE_EXTENSIONS

UNKNOWN_CLASS = -1


@dataclass(frozen=True, slots=True)  # slots: the ImageNet train listing holds 1.28M of these
class SourceItem:
    key: str  # stable sample key (webdataset __key__), unique within a split
    cls: int  # class index (sorted class names / wnids), UNKNOWN_CLASS when there is no label
    path: str  # the image file, or the tar that holds it
    offset: int = 0  # absolute byte offset of the image inside `path` when it is a tar
    size: int = -1  # number of bytes inside the tar; -1 reads the whole file


@dataclass
class SourceListing:
    items: list[SourceItem]
    class_names: list[str]
    skipped: list[dict]  # {"key" or "path", "reason"} for files that never became items


def list_source(source: str | Path, val_labels: str | Path | None = None) -> SourceListing:
    """Index a source: a directory tree (ImageFolder or flat) or an ILSVRC2012 train/val tar."""
    source = Path(source)
    if source.is_dir():
        listing = list_image_folder(source)
        if val_labels:  # e.g. the extracted ILSVRC2012 val folder: flat, labels come from the devkit
            labels = load_val_labels(val_labels)
            listing.items = [replace(item, cls=labels.get(Path(item.key).name, item.cls)) for item in listing.items]
        return listing
    if source.is_file() and tarfile.is_tarfile(source):
        return list_ilsvrc_tar(source, val_labels)
    raise FileNotFoundError(
        f"shard source {str(source)!r} is neither a directory of images nor a tar file; pass an ImageFolder "
        "directory or ILSVRC2012_img_train.tar / ILSVRC2012_img_val.tar"
    )


def read_item_bytes(item: SourceItem, descriptors: dict[str, int] | None = None) -> bytes:
    """The encoded image bytes of one item.

    Tar items are read with `os.pread` on a descriptor cached per process in `descriptors`: pread takes an
    explicit offset, so processes that inherited a descriptor through fork never race on a shared file position.
    """
    if item.size < 0:
        return Path(item.path).read_bytes()
    if descriptors is None:
        with open(item.path, "rb") as f:
            return os.pread(f.fileno(), item.size, item.offset)
    fd = descriptors.get(item.path)
    if fd is None:
        fd = descriptors[item.path] = os.open(item.path, os.O_RDONLY)
    data = os.pread(fd, item.size, item.offset)
    if len(data) != item.size:
        raise OSError(f"short read: {len(data)} of {item.size} bytes at offset {item.offset}")
    return data


def close_descriptors(descriptors: dict[str, int]) -> None:
    for fd in descriptors.values():
        os.close(fd)
    descriptors.clear()


# ----------------------------------------------------------------------------------------------- directory trees


def list_image_folder(root: Path) -> SourceListing:
    """ImageFolder layout: root/<class>/**/<image>; classes are the sorted top-level folders.

    A tree without class folders (images directly under root) gets cls = -1 for those images.
    """
    class_names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    class_index = {name: i for i, name in enumerate(class_names)}
    items, skipped, seen = [], [], set()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root)
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.append({"path": str(relative), "reason": "not an image file extension"})
            continue
        key = sample_key(relative)
        if key in seen:
            skipped.append({"path": str(relative), "reason": f"duplicate sample key {key!r}"})
            continue
        seen.add(key)
        cls = class_index[relative.parts[0]] if len(relative.parts) > 1 else UNKNOWN_CLASS
        items.append(SourceItem(key=key, cls=cls, path=str(path)))
    return SourceListing(items, class_names, skipped)


def sample_key(relative: Path) -> str:
    """Relative path without extension, dots replaced: webdataset splits a key from its field at the first dot."""
    stem = relative.stem.replace(".", "_")
    return str(relative.with_name(stem)).replace(os.sep, "/")


# ----------------------------------------------------------------------------------------------- ILSVRC2012 tars


def list_ilsvrc_tar(tar_path: Path, val_labels: str | Path | None) -> SourceListing:
    """The train tar (a tar of per-class tars `n01440764.tar`, ...) or the flat val tar of JPEGs."""
    found: list[tuple[SourceItem, str | None]] = []  # (item, wnid of its per-class tar or None)
    skipped, wnids = [], []
    tar_name = str(tar_path)  # one string shared by every item
    with open(tar_path, "rb") as outer_file, open(tar_path, "rb") as inner_file:
        # Iterating an uncompressed tar on a seekable file reads headers and seeks past the data.
        for member in tarfile.open(fileobj=outer_file, mode="r:"):
            name = Path(member.name)
            if not member.isfile():
                continue
            if name.suffix.lower() == ".tar":
                wnids.append(name.stem)
                found += [(item, name.stem) for item in _inner_tar_items(inner_file, member, tar_name)]
            elif name.suffix.lower() in IMAGE_EXTENSIONS:
                item = SourceItem(name.stem, UNKNOWN_CLASS, tar_name, member.offset_data, member.size)
                found.append((item, None))
            else:
                skipped.append({"path": member.name, "reason": "not an image file extension"})
    # Train: class index = position of the wnid in sorted order (the usual ImageNet indexing).
    wnid_index = {wnid: i for i, wnid in enumerate(sorted(wnids))}
    val_index = load_val_labels(val_labels) if val_labels else {}
    items = [
        replace(item, cls=wnid_index[wnid] if wnid else val_index.get(item.key, UNKNOWN_CLASS)) for item, wnid in found
    ]
    return SourceListing(sorted(items, key=lambda it: it.key), sorted(wnids), skipped)


def _inner_tar_items(handle, member: tarfile.TarInfo, tar_name: str) -> list[SourceItem]:
    """Index one per-class tar in place. TarFile records absolute offsets of the handle it reads."""
    handle.seek(member.offset_data)
    end = member.offset_data + member.size
    found = []
    for inner in tarfile.open(fileobj=handle, mode="r:"):
        if inner.offset >= end:  # an inner tar without end-of-archive blocks: stop at its last byte
            break
        if inner.isfile():
            found.append(SourceItem(Path(inner.name).stem, UNKNOWN_CLASS, tar_name, inner.offset_data, inner.size))
    return found


def load_val_labels(path: str | Path) -> dict[str, int]:
    """Validation labels as {image stem: class index in sorted-wnid order}.

    Accepts the ILSVRC2012 devkit (the `.tar.gz` or its unpacked folder: meta.mat + ground-truth file, whose
    ILSVRC2012_IDs are *not* the sorted-wnid order and are mapped here), or a text file of `name label` lines
    where label is a class index or a wnid (e.g. the common `val.txt`).
    """
    path = Path(path)
    if path.is_dir():
        return _devkit_labels(path)
    if path.name.endswith((".tar.gz", ".tgz", ".tar")):
        with tempfile.TemporaryDirectory() as tmp, tarfile.open(path) as devkit:
            for member in devkit.getmembers():  # copy out only the two files needed, under fixed names
                if member.isfile() and member.name.endswith(("meta.mat", "validation_ground_truth.txt")):
                    (Path(tmp) / Path(member.name).name).write_bytes(devkit.extractfile(member).read())
            return _devkit_labels(Path(tmp))
    return _text_labels(path)


def _devkit_labels(root: Path) -> dict[str, int]:
    from scipy.io import loadmat  # scipy is only needed for devkit labels

    meta_file = next(root.rglob("meta.mat"), None)
    truth_file = next(root.rglob("*validation_ground_truth.txt"), None)
    if meta_file is None or truth_file is None:
        raise FileNotFoundError(f"{root} is not an ILSVRC2012 devkit: expected data/meta.mat and the ground-truth txt")
    synsets = loadmat(meta_file, squeeze_me=True)["synsets"]
    leaves = [s for s in synsets if int(s["num_children"]) == 0]  # the 1000 classes; the rest are WordNet parents
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in leaves}
    wnid_index = {wnid: i for i, wnid in enumerate(sorted(id_to_wnid.values()))}
    ids = [int(line) for line in truth_file.read_text().split()]
    return {f"ILSVRC2012_val_{n:08d}": wnid_index[id_to_wnid[i]] for n, i in enumerate(ids, start=1)}


def _text_labels(path: Path) -> dict[str, int]:
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    if any(len(row) != 2 for row in rows):
        raise ValueError(
            f"{path}: expected `name label` on every line; for the devkit's one-id-per-line ground truth pass the "
            "devkit itself (ILSVRC2012_devkit_t12.tar.gz or its folder), which also holds the id -> wnid table"
        )
    labels = [label for _, label in rows]
    if all(label.isdigit() for label in labels):
        return {Path(name).stem: int(label) for name, label in rows}
    wnid_index = {wnid: i for i, wnid in enumerate(sorted(set(labels)))}
    return {Path(name).stem: wnid_index[label] for name, label in rows}
