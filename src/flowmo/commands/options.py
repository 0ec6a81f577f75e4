"""Options several commands share, written once. No torch here: the parsers answer before it loads, so the sampler
names are listed here and tests/test_cli.py checks they are flowmo.flow.SAMPLERS' own."""

from __future__ import annotations

import argparse

SAMPLER_NAMES = ("paper", "fast")  # flowmo.flow.SAMPLERS holds their settings
DEVICE_HELP = "auto (cuda when available, else cpu), cpu, cuda, cuda:1"
TOKENIZER_HELP = "a .ckpt, an exported .pt or save_pretrained folder, flowmo_lo/hi.pth, or a released name: lo, hi"


def add_sampler(parser: argparse.ArgumentParser, steps: bool = True) -> None:
    """--sampler NAME (the tokenizer's decoder) and, with `steps`, --steps N overriding its step count."""
    parser.add_argument(
        "--sampler",
        choices=SAMPLER_NAMES,
        default="paper",
        help="the tokenizer's decoder, from flowmo.flow.SAMPLERS: paper (the paper's: 31 network "
        "evaluations) or fast (the same grid and guidance in fewer steps: 10 evaluations)",
    )
    if steps:
        parser.add_argument("--steps", type=int, default=None, help="sampler steps instead of the named sampler's")


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
