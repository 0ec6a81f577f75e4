"""`flowmo generate --generator G.ckpt --tokenizer lo --classes 0,1,2 --per-class 4 --out samples/`: class-conditional
samples of a MaskGIT generator decoded by its tokenizer: `class{c}_{i}.png` and `grid.png`, with the time per image
of the generator and of the decode (flowmo.generate.sample has the work)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flowmo.commands.options import add_device, add_sampler


def parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowmo generate",
        allow_abbrev=False,
        description="class-conditional samples from a MaskGIT generator, decoded by its tokenizer",
    )
    parser.add_argument("--generator", required=True, help="a MaskGITModule checkpoint (flowmo gen fit)")
    parser.add_argument("--tokenizer", required=True, help="the tokenizer that wrote its training tokens")
    parser.add_argument("--classes", required=True, help="comma-separated class indices, e.g. 1,2,3")
    parser.add_argument("--per-class", type=int, default=4)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=None, help="decoding steps (default: the generator's)")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--choice-temperature", type=float, default=None)
    parser.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (1 = off)")
    add_sampler(parser, steps=False)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    add_device(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    # here, not above: --help answers before torch and Lightning load
    from flowmo.errors import UserError
    from flowmo.generate.sample import generate_images, load_generator, parse_classes, write_images
    from flowmo.generate.tokens import check_same_tokenizer
    from flowmo.tools import load_tokenizer, resolve_device

    device = resolve_device(args.device)
    try:
        generator = load_generator(args.generator, device)
        tokenizer = load_tokenizer(args.tokenizer, device)
        check_same_tokenizer(generator.tokenizer_sha256, tokenizer, "the generator's training tokens")
        classes = parse_classes(args.classes)
        settings = dict(
            steps=args.steps, temperature=args.temperature, choice_temperature=args.choice_temperature, cfg=args.cfg
        )
        images, seconds = generate_images(
            generator, tokenizer, classes, args.per_class, args.seed, args.batch, args.sampler, **settings
        )
    except (UserError, ValueError) as error:
        print(f"flowmo generate: {error}", file=sys.stderr)
        return 2
    grid = write_images(images, classes, args.per_class, Path(args.out))
    count = len(images)
    print(
        f"{count} samples -> {grid}; per image: generator {1000 * seconds['generator'] / count:.1f} ms, "
        f"tokenizer decode ({args.sampler}) {1000 * seconds['tokenizer_decode'] / count:.1f} ms"
    )
    return 0
