"""`flowmo pretokenize --tokenizer lo --shards data/imagenet/train.json --out data/tokens-lo`: every image of an
image-shard split encoded once into token shards (flowmo.generate.pretokenize has the format and the work)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flowmo.commands.options import TOKENIZER_HELP


def parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowmo pretokenize",
        allow_abbrev=False,
        description="encode every image of an image-shard split once into token shards",
    )
    parser.add_argument("--tokenizer", required=True, help=TOKENIZER_HELP)
    parser.add_argument("--shards", required=True, help="the image shards' manifest (flowmo shards) or a glob")
    parser.add_argument("--out", required=True, help="output folder for {split}-NNNNNN.tar and {split}.json")
    parser.add_argument("--split", default="train", help="split name of the token shards (default train)")
    parser.add_argument("--crops", default="center", help="'center' or N random crops per image (default center)")
    parser.add_argument("--size", type=int, default=None, help="crop side in px (default: the tokenizer's)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random crops")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, gpu, cpu")
    parser.add_argument("--devices", default="auto", help="devices (ranks) to split the shards over")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def run(args: argparse.Namespace) -> int:
    import torch  # here, not above: --help answers before torch and Lightning load

    from flowmo.errors import UserError
    from flowmo.generate.pretokenize import pretokenize

    try:
        with torch.no_grad():
            devices = int(args.devices) if args.devices.isdigit() else args.devices
            manifest = pretokenize(
                args.tokenizer,
                args.shards,
                args.out,
                args.split,
                args.crops,
                args.size,
                args.seed,
                args.batch,
                args.accelerator,
                devices,
                progress=not args.no_progress,
            )
    except (UserError, ValueError) as error:
        print(f"flowmo pretokenize: {error}", file=sys.stderr)
        return 2
    print(
        f"{manifest['num_samples']} token rows ({manifest['tokens_dtype']}) in {manifest['num_shards']} shards, "
        f"{manifest['num_skipped']} images skipped -> {Path(args.out) / (args.split + '.json')}"
    )
    return 0
