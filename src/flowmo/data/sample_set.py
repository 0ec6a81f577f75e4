"""The embedded sample set: real photographs shipped inside installed packages, cut into crops, written as shards.

`flowmo sample-data --out data/sample` builds it in seconds, offline: the photos are read straight from the
package folders (`skimage.data.data_dir`, matplotlib's `mpl-data/sample_data`), never through loaders that
download. Train and val are split by photograph, so no photo appears in both.

Crops are taken at every scale: the side of a crop, in the photo's own pixels, is drawn log-uniformly between
`size` (native resolution, fine texture) and the photo's shorter side (the whole scene, downscaled), then stored
as JPEG at `size` px. A model trained on ~20 photographs sees each of them as hundreds of different images,
which is what lets the demo's tiny tokenizer reconstruct photos it never saw (issue: one 128 px downscale per
crop made it memorise textures). The first val crop of each photo is the whole center square.
Class index = photograph, sorted by name within each split (the labels are not used by FlowMo).
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

from PIL import Image

from flowmo.data.shards import write_shards

# Every real photograph the project's dependencies ship (no download): scikit-image's colour and grayscale
# photos (grayscale ones become RGB; they add structure the six colour photos lack) and matplotlib's portrait
# of Grace Hopper. The two motorcycle views show one scene, so they stay on the same side of the split.
# Left out: synthetic images (color wheel, chessboard, logo, phantom, horse silhouette), the 14x25 px GIF and
# the 25 px LFW face thumbnails (too small to crop at the demo's 32 px).
TRAIN_PHOTOS = (
    "astronaut.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "retina.jpg",
    "grace_hopper.jpg",
    "camera.png",
    "brick.png",
    "grass.png",
    "gravel.png",
    "moon.png",
    "coins.png",
    "page.png",
    "clock_motion.png",
    "cell.png",
    "text.png",
    "microaneurysms.png",
)
VAL_PHOTOS = ("chelsea.png", "coffee.png", "rocket.jpg")
MATPLOTLIB_PHOTOS = ("grace_hopper.jpg",)  # in matplotlib's mpl-data/sample_data; the rest are scikit-image's


def photo_path(name: str) -> Path:
    # imported here: only the sample set needs these packages' data folders
    if name in MATPLOTLIB_PHOTOS:
        import matplotlib

        folder, package = Path(matplotlib.get_data_path()) / "sample_data", "matplotlib>=3.7"
    else:
        import skimage.data

        folder, package = Path(skimage.data.data_dir), "scikit-image>=0.22"
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"{package.split('>')[0]} does not ship {name} at {path}; reinstall {package}.")
    return path


def random_square(width: int, height: int, rng: random.Random, min_side: int) -> tuple[int, int, int, int]:
    """A square whose side is log-uniform in [min_side, shorter side]: every scale equally often."""
    shorter = min(width, height)
    low = min(min_side, shorter)
    side = int(round(math.exp(rng.uniform(math.log(low), math.log(shorter)))))
    left, top = rng.randint(0, width - side), rng.randint(0, height - side)
    return left, top, left + side, top + side


def center_square(width: int, height: int) -> tuple[int, int, int, int]:
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def crop_boxes(
    width: int, height: int, count: int, rng: random.Random, with_center: bool, min_side: int
) -> list[tuple]:
    """`count` square crop boxes; the first is the full center square when `with_center` (val)."""
    boxes = [center_square(width, height)] if with_center else []
    return boxes + [random_square(width, height, rng, min_side) for _ in range(count - len(boxes))]


def jitter_colour(image: Image.Image, rng: random.Random, tint_grey: float) -> Image.Image:
    """A random hue rotation and saturation scale (x0.5..x2, log-uniform) of one crop.

    Eleven of the 18 training photographs are grayscale and the colour ones are mostly skin, fabric and
    micrographs: without this, a held-out blue sky or orange fur decodes as the nearest colour the model
    knows (a flat image of a random colour scored ~20 dB, a grey one ~36 dB). With probability `tint_grey`
    a grayscale crop is first given a random colour (a duotone), so flat coloured regions are seen too.
    """
    hue, saturation, value = image.convert("HSV").split()
    if saturation.getextrema()[1] < 8 and rng.random() < tint_grey:
        hue = Image.new("L", image.size, rng.randrange(256))
        saturation = Image.new("L", image.size, int(rng.uniform(40, 200)))
    shift, scale = rng.randrange(256), math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    hue = hue.point(lambda h: (h + shift) % 256)
    saturation = saturation.point(lambda s: min(255, int(round(s * scale))))
    return Image.merge("HSV", (hue, saturation, value)).convert("RGB")


def write_photo_crops(
    photo: str,
    folder: Path,
    count: int,
    size: int,
    seed: int,
    with_center: bool,
    colour_jitter: bool = False,
    tint_grey: float = 0.0,
) -> None:
    """Crops of one photograph as `folder/<photo>/<photo>_NNN.jpg` (an ImageFolder class per photo)."""
    stem = Path(photo).stem
    rng = random.Random(f"{seed}-{stem}")  # per photo, so adding a photo leaves the others' crops unchanged
    class_dir = folder / stem
    class_dir.mkdir(parents=True, exist_ok=True)
    with Image.open(photo_path(photo)) as source:
        image = source.convert("RGB")
    for index, box in enumerate(crop_boxes(*image.size, count, rng, with_center, min_side=size)):
        crop = image.crop(box).resize((size, size), Image.Resampling.LANCZOS)
        if colour_jitter:
            crop = jitter_colour(crop, rng, tint_grey)
        crop.save(class_dir / f"{stem}_{index:03d}.jpg", quality=90)


def build_sample_set(
    out_dir: str | Path,
    size: int = 128,
    train_crops_per_photo: int = 64,
    val_crops_per_photo: int = 16,
    shard_size: int = 16,
    seed: int = 0,
    colour_jitter: bool = False,
    tint_grey: float = 0.0,
) -> dict[str, dict]:
    """Write `train-*.tar`, `val-*.tar` and their manifests to out_dir; returns {"train": manifest, "val": ...}.

    Always rebuilds from scratch (it takes seconds), so a changed size never mixes with old shards.
    """
    out_dir = Path(out_dir)
    staging = out_dir / ".staging"  # a fixed path: the manifests record the source they were written from
    _remove_previous_build(out_dir)
    manifests = {}
    for split, photos, count in (
        ("train", TRAIN_PHOTOS, train_crops_per_photo),
        ("val", VAL_PHOTOS, val_crops_per_photo),
    ):
        for photo in photos:
            jitter = colour_jitter and split == "train"  # the held-out photos keep their own colours
            write_photo_crops(
                photo,
                staging / split,
                count,
                size,
                seed,
                with_center=split == "val",
                colour_jitter=jitter,
                tint_grey=tint_grey,
            )
        manifests[split] = write_shards(
            staging / split,
            out_dir,
            split,
            shard_size=shard_size,
            workers=1,
            shuffle=split == "train",
            seed=seed,
            progress=False,
        )
    shutil.rmtree(staging)
    return manifests


def ensure_sample_data(
    data_dir: str | Path, size: int, train_crops: int, val_crops: int, tint_grey: float = -1.0
) -> None:
    """Build the sample set in data_dir (the demo's and the tiny ablation grid's) unless it already holds one made
    with these settings. tint_grey < 0: no colour jitter; else jitter every training crop and tint grayscale ones
    with that probability."""
    data_dir = Path(data_dir)
    wanted = {
        "size": size,
        "train_crops_per_photo": train_crops,
        "val_crops_per_photo": val_crops,
        "colour_jitter": tint_grey >= 0,
        "tint_grey": max(tint_grey, 0.0),
    }
    stamp = data_dir / "demo_sample_set.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted and (data_dir / "val.json").is_file():
        return
    print(f"building the sample set in {data_dir} ({size} px crops at every scale)")
    build_sample_set(
        data_dir,
        size=size,
        train_crops_per_photo=train_crops,
        val_crops_per_photo=val_crops,
        shard_size=256,
        colour_jitter=tint_grey >= 0,
        tint_grey=max(tint_grey, 0.0),
    )
    stamp.write_text(json.dumps(wanted) + "\n")


def _remove_previous_build(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for pattern in (
        ".staging",
        "train-*",
        "val-*",
        "train.json",
        "val.json",
        "train.index.npz",
        "val.index.npz",
        ".train-parts",
        ".val-parts",
    ):
        for old in out_dir.glob(pattern):
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
