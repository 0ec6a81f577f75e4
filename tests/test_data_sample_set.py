"""The embedded sample set: built offline from scikit-image's photographs, split by photograph."""

import json
import tarfile

from PIL import Image

from flowmo.commands import main as flowmo_main
from flowmo.data import FlowMoDataModule, build_sample_set
from flowmo.data.sample_set import TRAIN_PHOTOS, VAL_PHOTOS


def main(argv: list[str]) -> int:
    return flowmo_main(["sample-data", *argv])


def test_sample_set_splits_by_photo_and_stores_jpeg_crops(tmp_path):
    manifests = build_sample_set(tmp_path, size=48, train_crops_per_photo=3, val_crops_per_photo=2, shard_size=4)
    assert manifests["train"]["num_samples"] == 3 * len(TRAIN_PHOTOS)
    assert manifests["val"]["num_samples"] == 2 * len(VAL_PHOTOS)
    assert not set(manifests["train"]["classes"]) & set(manifests["val"]["classes"])  # no photo in both splits
    with tarfile.open(tmp_path / "val-000000.tar") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        with Image.open(tar.extractfile(member)) as image:
            assert image.format == "JPEG" and image.size == (48, 48)
    assert not (tmp_path / ".staging").exists()

    data = FlowMoDataModule(
        str(tmp_path / "train.json"), str(tmp_path / "val.json"), image_size=32, batch_size=2, num_workers=0
    )
    data.setup("fit")
    assert next(iter(data.train_dataloader()))["image"].shape == (2, 3, 32, 32)
    assert sum(len(batch["key"]) for batch in data.val_dataloader()) == 2 * len(VAL_PHOTOS)


def test_sample_data_cli_rebuilds_in_place(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--size", "32", "--train-crops", "2", "--val-crops", "1"]
    assert main(argv) == 0 and main(argv) == 0  # a second build replaces the first
    assert "val: 3 images of 32px" in capsys.readouterr().out
    assert json.loads((tmp_path / "train.json").read_text())["num_samples"] == 2 * len(TRAIN_PHOTOS)


def test_crops_span_native_resolution_to_the_whole_photo():
    import math
    import random

    from flowmo.data.sample_set import crop_boxes

    boxes = crop_boxes(600, 400, 2000, random.Random(0), with_center=True, min_side=32)
    sides = [right - left for left, top, right, bottom in boxes]
    assert boxes[0] == (100, 0, 500, 400)  # val's first crop: the whole center square
    assert all(
        32 <= side <= 400 and bottom - top == right - left for side, (left, top, right, bottom) in zip(sides, boxes)
    )
    # log-uniform: as many crops below the geometric middle of [32, 400] as above it
    middle = math.sqrt(32 * 400)
    assert abs(sum(side < middle for side in sides) / len(sides) - 0.5) < 0.05
    assert all(left >= 0 and top >= 0 and right <= 600 and bottom <= 400 for left, top, right, bottom in boxes)


def _crops(folder, split: str) -> dict[str, Image.Image]:
    images = {}
    for shard in sorted(folder.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            for member in (m for m in tar.getmembers() if m.name.endswith(".jpg")):
                images[member.name] = Image.open(tar.extractfile(member)).convert("RGB")
    return images


def _saturation(image: Image.Image) -> float:
    return sum(image.convert("HSV").getchannel("S").getdata()) / (image.width * image.height)


def test_colour_jitter_changes_training_colours_only(tmp_path):
    """Hue/saturation jitter of every training crop, tinted grayscale crops; held-out crops untouched."""
    plain = build_sample_set(tmp_path / "plain", size=32, train_crops_per_photo=6, val_crops_per_photo=2)
    jittered = build_sample_set(
        tmp_path / "jitter", size=32, train_crops_per_photo=6, val_crops_per_photo=2, colour_jitter=True, tint_grey=1.0
    )
    assert plain["train"]["num_samples"] == jittered["train"]["num_samples"]
    val_plain, val_jittered = _crops(tmp_path / "plain", "val"), _crops(tmp_path / "jitter", "val")
    assert val_plain.keys() == val_jittered.keys()
    assert all(val_plain[k].tobytes() == val_jittered[k].tobytes() for k in val_plain)
    train_plain, train_jittered = _crops(tmp_path / "plain", "train"), _crops(tmp_path / "jitter", "train")
    grey = [k for k in train_plain if k.split("/")[-1].startswith(("camera", "moon", "coins"))]
    assert grey and all(_saturation(train_plain[k]) < 8 for k in grey)  # grayscale photos...
    assert all(_saturation(train_jittered[k]) > 20 for k in grey)  # ...tinted with tint_grey = 1
    colour = [k for k in train_plain if k.split("/")[-1].startswith("astronaut")]
    hues = {
        k: (
            train_plain[k].convert("HSV").getchannel("H").getdata(),
            train_jittered[k].convert("HSV").getchannel("H").getdata(),
        )
        for k in colour
    }
    assert sum(list(before) != list(after) for before, after in hues.values()) == len(colour)
