"""`flowmo generate`: class-conditional samples from a MaskGIT generator, decoded by its tokenizer.

    flowmo generate --generator runs/gen-tiny/checkpoints/last.ckpt --tokenizer runs/demo-1b/checkpoints/last.ckpt \
        --classes 0,1,2 --per-class 4 --out samples/

Writes `class{c}_{i}.png` per sample and `grid.png` (a row per class), and prints the time per image of the
generator and of the tokenizer's decode separately. The tokenizer must be the one whose tokens trained the
generator (checked by weights hash).
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from flowmo.checkpoint import UnsafeWeightsError
from flowmo.errors import UserError
from flowmo.generate.module import MaskGITModule


def load_generator(path: str, device: str) -> MaskGITModule:
    if not Path(path).is_file():
        raise UserError(f"--generator {path} does not exist; give a checkpoint written by `flowmo gen fit`.")
    try:
        return MaskGITModule.load_from_checkpoint(path, map_location="cpu", weights_only=True).to(device).eval()
    except pickle.UnpicklingError:
        raise UnsafeWeightsError(path) from None


def parse_classes(text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise UserError(f"--classes must be comma-separated class indices such as 1,2,3, got {text!r}.") from None


def generate_images(
    generator: MaskGITModule,
    tokenizer,
    classes: list[int],
    per_class: int,
    seed: int,
    batch: int,
    sampler: str,
    **settings,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Images [len(classes) * per_class, 3, H, W] in [-1, 1], class-major, and seconds spent per stage."""
    labels = torch.tensor(classes, device=generator.device).repeat_interleave(per_class)
    rng = torch.Generator(device=generator.device).manual_seed(seed)
    seconds = {"generator": 0.0, "tokenizer_decode": 0.0}
    images = []
    for start in range(0, len(labels), batch):
        began = time.perf_counter()
        ids = generator.generate(labels[start : start + batch], generator=rng, **settings)
        decoded_at = time.perf_counter()
        images.append(tokenizer.detokenize(ids, generator=rng, sampler=sampler).float().cpu())
        seconds["generator"] += decoded_at - began
        seconds["tokenizer_decode"] += time.perf_counter() - decoded_at
    return torch.cat(images), seconds


def write_images(images: torch.Tensor, classes: list[int], per_class: int, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    pixels = ((images + 1) / 2).clamp(0, 1)
    for index, image in enumerate(pixels):
        save_image(image, out / f"class{classes[index // per_class]}_{index % per_class}.png")
    grid_path = out / "grid.png"
    save_image(make_grid(pixels, nrow=per_class, padding=2, pad_value=1.0), grid_path)
    return grid_path
