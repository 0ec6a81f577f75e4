"""`flowmo export --ckpt X --out tok.pt`: a light tokenizer file (config + one set of weights) for downstream users."""

from __future__ import annotations

import argparse
import sys


def parser(command: str = "export") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowmo export", allow_abbrev=False,
                                     description="export a light tokenizer file (config + EMA or raw weights)")
    parser.add_argument("--ckpt", required=True, help="a FlowMoModule .ckpt, an official flowmo_*.pth, or lo / hi")
    parser.add_argument("--out", required=True, help="where to write the .pt file")
    parser.add_argument("--weights", choices=("ema", "raw"), default="ema")
    return parser


def run(args: argparse.Namespace) -> int:
    # here, not above: --help answers before torch loads
    from flowmo.checkpoint import export_tokenizer
    from flowmo.errors import UserError
    from flowmo.nn.tokenizer import FlowMoTokenizer

    try:
        tokenizer = FlowMoTokenizer.from_checkpoint(args.ckpt, weights=args.weights)
    except UserError as error:
        print(f"flowmo export: {error}", file=sys.stderr)
        return 2
    path = export_tokenizer(tokenizer, args.out)
    print(f"wrote {path} ({sum(p.numel() for p in tokenizer.parameters()) / 1e6:.1f}M parameters, {args.weights} weights)")
    return 0
