"""Generated image sources for the data tests: tiny JPEGs, one truncated JPEG, one non-image. No downloads."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def jpeg_bytes(seed: int, size: tuple[int, int] = (40, 32)) -> bytes:
    """A small smooth colour image (gradient + noise) as JPEG bytes; `size` is (width, height)."""
    rng = np.random.default_rng(seed)
    width, height = size
    ramp = np.linspace(0, 255, width)[None, :, None] * rng.uniform(0.2, 1.0, size=(1, 1, 3))
    pixels = np.clip(ramp + rng.normal(0, 20, size=(height, width, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def truncated_jpeg_bytes() -> bytes:
    data = jpeg_bytes(999, size=(64, 48))
    return data[: len(data) // 2]


NOT_AN_IMAGE = b"this is a text file pretending to be a JPEG\n"


def make_image_folder(root: Path, per_class: int = 3) -> Path:
    """root/{cat,dog}/img_N.jpg, plus cat/broken.jpg (truncated), dog/fake.jpg (text), dog/notes.txt."""
    for class_index, name in enumerate(["cat", "dog"]):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            (folder / f"img_{i}.jpg").write_bytes(jpeg_bytes(10 * class_index + i))
    (root / "cat" / "broken.jpg").write_bytes(truncated_jpeg_bytes())
    (root / "dog" / "fake.jpg").write_bytes(NOT_AN_IMAGE)
    (root / "dog" / "notes.txt").write_text("not an image\n")
    return root


def tar_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def make_ilsvrc_train_tar(path: Path) -> dict[str, bytes]:
    """ILSVRC2012_img_train.tar layout: a tar of per-class tars (wnid.tar) of `wnid_N.JPEG`. Returns the images."""
    images, inner_tars = {}, {}
    for class_index, wnid in enumerate(["n02000002", "n01000001"]):  # stored unsorted on purpose
        files = {f"{wnid}_{i}.JPEG": jpeg_bytes(100 * class_index + i) for i in range(3)}
        images.update(files)
        if class_index == 0:
            files[f"{wnid}_bad.JPEG"] = truncated_jpeg_bytes()
        inner_tars[f"{wnid}.tar"] = tar_of(files)
    path.write_bytes(tar_of(inner_tars))
    return images


def make_ilsvrc_val_tar(path: Path, count: int = 4) -> dict[str, bytes]:
    """ILSVRC2012_img_val.tar layout: a flat tar of ILSVRC2012_val_NNNNNNNN.JPEG."""
    images = {f"ILSVRC2012_val_{n:08d}.JPEG": jpeg_bytes(200 + n) for n in range(1, count + 1)}
    path.write_bytes(tar_of(images))
    return images


def write_shard(path: Path, samples: dict[str, bytes]) -> Path:
    """A hand-made shard: {member name: bytes}, e.g. {"a.jpg": ..., "a.cls": b"0"}."""
    path.write_bytes(tar_of(samples))
    return path


def make_val_shards(folder: Path, shards: int = 4, per_shard: int = 3, size: tuple[int, int] = (40, 32)) -> set[str]:
    """`shards` val shards of `per_shard` valid samples; returns every key."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = set()
    for s in range(shards):
        samples = {}
        for i in range(per_shard):
            key = f"s{s}_{i}"
            keys.add(key)
            samples[f"{key}.jpg"] = jpeg_bytes(s * 100 + i, size)
            samples[f"{key}.cls"] = str(s).encode()
        write_shard(folder / f"val-{s:06d}.tar", samples)
    return keys
