"""Image transforms of method §6, as plain functions (no Lightning, no DataLoader needed).

Train: Resize(shorter side = size, bilinear with antialias) + RandomCrop(size), no flip unless asked. Val/test:
Resize + CenterCrop. Both through torchvision's functional transforms on PIL images (the authors' pipeline); the
crop position is drawn from the caller's ``random.Random``, so a crop is a function of (seed, sample) and a resumed
run replays it. Output: float32 CHW with p / 127.5 - 1, i.e. in [-1, 1].
"""

from __future__ import annotations

import io
import random

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

# The one list of image files flowmo reads (folders, tars, the file tools) and the shard fields that hold them.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm")
IMAGE_FIELDS = tuple(extension[1:] for extension in IMAGE_EXTENSIONS)  # in a sample, the first one present
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white (documented in the README)


def decode_rgb(data: bytes) -> Image.Image:
    """Decode encoded image bytes (JPEG, PNG, ...) to an 8-bit RGB PIL image; raises on corrupt data.

    16-bit images (PNG modes I;16 / I) are scaled to 8 bits, not clipped (a plain convert saturates them
    to white); images with alpha are composited on ALPHA_BACKGROUND, not stripped (hidden colours showed).
    """
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            scale = 1 / 257 if image.mode.startswith("I;16") or image.getextrema()[1] > 255 else 1
            image = image.point(lambda value: value * scale).convert("L")
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")  # grayscale, CMYK and palette images exist in ImageNet


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """torchvision's Resize(size) on a PIL image: shorter side = size, PIL's bilinear filter (antialiased)."""
    return TF.resize(image, [size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)


def to_signed_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 HWC PIL image -> float32 [3, H, W] in [-1, 1] (p / 127.5 - 1)."""
    return TF.pil_to_tensor(image).float().div_(127.5).sub_(1.0)


def train_transform(image: Image.Image, size: int, rng: random.Random, random_flip: bool = False) -> torch.Tensor:
    """Resize(shorter side) + RandomCrop(size) (+ optional horizontal flip) -> [3, size, size] in [-1, 1]."""
    image = resize_shorter_side(image, size)
    width, height = image.size
    top, left = rng.randint(0, height - size), rng.randint(0, width - size)
    image = TF.crop(image, top, left, size, size)
    if random_flip and rng.random() < 0.5:
        image = TF.horizontal_flip(image)
    return to_signed_tensor(image)


def val_transform(image: Image.Image, size: int) -> torch.Tensor:
    """Resize(shorter side) + CenterCrop(size) -> [3, size, size] in [-1, 1]; deterministic."""
    return to_signed_tensor(TF.center_crop(resize_shorter_side(image, size), [size, size]))
