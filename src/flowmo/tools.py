"""File-level tools: images in, images or token ids out (the work of `flowmo reconstruct | tokenize | detokenize`,
whose arguments live in flowmo.commands.files).

    flowmo reconstruct --tokenizer runs/demo-1b/checkpoints/last.ckpt photo.jpg more/ --out recon/
    flowmo tokenize    --tokenizer lo photos/ --out tokens/                   # one <name>.npy of ids per image
    flowmo detokenize  --tokenizer lo tokens/ --out decoded/ --size 256

--tokenizer takes a FlowMoModule .ckpt, an exported .pt, the authors' flowmo_lo.pth / flowmo_hi.pth (EMA
weights), or a released name: lo / hi (downloaded from the authors' Hugging Face repository on first use).
Images are resized (shorter side) and center-cropped to --size (default: the tokenizer's training size), as in
evaluation. Unreadable images are skipped and counted; the run says how many.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import save_image

from flowmo.checkpoint import from_checkpoint
from flowmo.data.transforms import IMAGE_EXTENSIONS, decode_rgb, val_transform
from flowmo.errors import UserError
from flowmo.nn.tokenizer import FlowMoTokenizer
from flowmo.optim import describe_weights


def load_tokenizer(source: str, device: str) -> FlowMoTokenizer:
    """EMA weights of any tokenizer file, or of a released name (lo, hi), on `device`, in eval mode; the console
    says which weights (step, EMA updates)."""
    model = from_checkpoint(source, weights="ema").to(device).eval()
    print(f"{source}: {describe_weights(model.weights_record)}", file=sys.stderr)
    return model


def list_files(inputs: list[str], suffixes: tuple[str, ...]) -> list[Path]:
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.suffix.lower() in suffixes)
        elif item.is_file():
            files.append(item)
        else:
            raise UserError(f"{item} does not exist; give image files or folders.")
    if not files:
        raise UserError(f"no {'/'.join(sorted(suffixes))} files in {', '.join(inputs)}.")
    return files


def image_batches(files: list[Path], size: int, batch: int, skipped: list[Path]):
    """(files, [B, 3, size, size] in [-1, 1]) batch by batch, so a folder of any size never sits in memory; an
    unreadable or corrupt file is skipped and appended to `skipped`."""
    for _, chunk in batches(files, batch):
        kept, tensors = [], []
        for path in chunk:
            try:
                tensors.append(val_transform(decode_rgb(path.read_bytes()), size))
                kept.append(path)
            except Exception:  # noqa: BLE001 - an unreadable or corrupt file: skip it, count it, go on
                skipped.append(path)
        if kept:
            yield kept, torch.stack(tensors)


def batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


def progress(done: int, total: int, what: str) -> None:
    print(f"\r{what}: {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)


def save_png(image: torch.Tensor, path: Path) -> None:
    """A [3, H, W] image in [-1, 1] as a PNG, through torchvision's save_image (which takes [0, 1])."""
    save_image((image.float().clamp(-1, 1) + 1) / 2, path)


def reconstruct(args: argparse.Namespace, model: FlowMoTokenizer) -> int:
    files, skipped, done = list_files(args.inputs, IMAGE_EXTENSIONS), [], 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    for kept, batch in image_batches(files, args.size or model.config.image_size, args.batch, skipped):
        batch = batch.to(args.device)
        recon = model.reconstruct(batch, generator=generator, **sampler_choice(args))
        for path, source, target in zip(kept, batch, recon):
            save_png(torch.cat([source, target], dim=-1), out / f"{path.stem}.png")
        done += len(kept)
        progress(done + len(skipped), len(files), "reconstruct")
    return report(done, skipped, out, "input | reconstruction PNGs")


def tokenize(args: argparse.Namespace, model: FlowMoTokenizer) -> int:
    files, skipped, done = list_files(args.inputs, IMAGE_EXTENSIONS), [], 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if model.quantizer.codebook_size <= 2**16 else np.int64  # the smallest that holds the ids
    for kept, batch in image_batches(files, args.size or model.config.image_size, args.batch, skipped):
        ids = model.tokenize(batch.to(args.device)).cpu().numpy().astype(dtype)
        for path, row in zip(kept, ids):
            np.save(out / f"{path.stem}.npy", row)
        done += len(kept)
        progress(done + len(skipped), len(files), "tokenize")
    return report(done, skipped, out, f"token id files ({dtype.__name__}, {model.ids_per_image} ids each)")


def sampler_choice(args: argparse.Namespace) -> dict:
    """The sampler keywords of reconstruct/detokenize from --sampler and --steps."""
    return {"sampler": args.sampler, **({"steps": args.steps} if args.steps is not None else {})}


def detokenize(args: argparse.Namespace, model: FlowMoTokenizer) -> int:
    files = list_files(args.inputs, (".npy",))
    size = args.size or model.config.image_size
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    for start, chunk in batches(files, args.batch):  # read batch by batch: the ids of a whole folder never pile up
        arrays = [load_ids(path) for path in chunk]
        try:
            stacked = np.stack(arrays)
        except ValueError as error:
            raise UserError(f"the .npy files hold id arrays of different lengths ({error}).") from None
        images = model.detokenize(stacked, image_size=(size, size), generator=generator, **sampler_choice(args))
        for path, image in zip(chunk, images):
            save_png(image, out / f"{path.stem}.png")
        progress(start + len(chunk), len(files), "detokenize")
    return report(len(files), [], out, "decoded PNGs")


def load_ids(path: Path) -> np.ndarray:
    try:
        ids = np.load(path)  # allow_pickle stays False: an object array (code) is refused like damage
    except (ValueError, OSError, EOFError) as error:
        raise UserError(
            f"{path} is not a readable .npy array of token ids ({error}); write it with numpy.save."
        ) from None
    return ids.astype(np.int64) if np.issubdtype(ids.dtype, np.integer) else ids


def report(done: int, skipped: list[Path], out: Path, what: str) -> int:
    print(
        f"wrote {done} {what} to {out}"
        + (f"; skipped {len(skipped)} unreadable: {', '.join(p.name for p in skipped[:5])}" if skipped else "")
    )
    return 0


COMMANDS = {"reconstruct": reconstruct, "tokenize": tokenize, "detokenize": detokenize}


def resolve_device(name: str) -> str:
    """A --device value: "auto" becomes cuda when a GPU is visible, else cpu; anything else is kept."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def run(args: argparse.Namespace, command: str) -> int:
    args.device = resolve_device(args.device)
    try:
        model = load_tokenizer(args.tokenizer, args.device)
        with torch.no_grad():
            return COMMANDS[command](args, model)
    except (UserError, ValueError) as error:
        print(f"flowmo {command}: {error}", file=sys.stderr)
        return 2
