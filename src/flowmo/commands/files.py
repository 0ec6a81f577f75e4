"""`flowmo reconstruct | tokenize | detokenize`: images in, images or token ids out (the work is flowmo.tools').

flowmo reconstruct --tokenizer runs/demo-1b/checkpoints/last.ckpt photo.jpg more/ --out recon/
flowmo tokenize    --tokenizer lo photos/ --out tokens/                   # one <name>.npy of ids per image
flowmo detokenize  --tokenizer lo tokens/ --out decoded/ --size 256
"""

from __future__ import annotations

import argparse

from flowmo.commands.options import TOKENIZER_HELP, add_device, add_sampler


def parser(command: str) -> argparse.ArgumentParser:
    what = {
        "reconstruct": "images or folders -> input | reconstruction PNGs",
        "tokenize": "images or folders -> one .npy of token ids per image",
        "detokenize": ".npy id files or folders -> decoded PNGs",
    }[command]
    parser = argparse.ArgumentParser(prog=f"flowmo {command}", description=what, allow_abbrev=False)
    parser.add_argument("inputs", nargs="+", help="files or folders")
    parser.add_argument("--tokenizer", required=True, help=TOKENIZER_HELP)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--size", type=int, help="image side in px (default: the tokenizer's training size)")
    parser.add_argument("--batch", type=int, default=8)
    add_sampler(parser)
    parser.add_argument("--seed", type=int, default=0, help="seeds the decoding noise")
    add_device(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from flowmo import tools  # here, not above: --help and argument errors answer before torch loads

    return tools.run(args, args.command)
