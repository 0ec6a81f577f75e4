"""`flowmo export --ckpt X --out DIR`: the tokenizer as huggingface_hub shares models (model.safetensors +
config.json + README.md model card), one set of weights, for downstream users and `push_to_hub`.
`--out tok.pt` writes the older light .pt file (config + weights), which every loader still reads."""

from __future__ import annotations

import argparse
import sys


def parser(command: str = "export") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowmo export",
        allow_abbrev=False,
        description="export a tokenizer: a save_pretrained folder (or a light .pt file)",
    )
    parser.add_argument("--ckpt", required=True, help="a FlowMoModule .ckpt, an official flowmo_*.pth, or lo / hi")
    parser.add_argument(
        "--out",
        required=True,
        help="a folder (model.safetensors + config.json + README.md), or a file ending in .pt or .pth",
    )
    parser.add_argument("--weights", choices=("ema", "raw"), default="ema")
    parser.add_argument("--metrics", help="the run's results/<run>/metrics.json, whose figures the model card quotes")
    return parser


def run(args: argparse.Namespace) -> int:
    # here, not above: --help answers before torch loads
    from flowmo.checkpoint import export_tokenizer, from_checkpoint
    from flowmo.errors import UserError
    from flowmo.hub import save_pretrained
    from flowmo.optim import describe_weights

    try:
        tokenizer = from_checkpoint(args.ckpt, weights=args.weights)
        if args.out.endswith((".pt", ".pth")):  # the single-file export; anything else names a folder
            path = export_tokenizer(tokenizer, args.out)
        else:
            path = save_pretrained(tokenizer, args.out, metrics=args.metrics)
    except UserError as error:
        print(f"flowmo export: {error}", file=sys.stderr)
        return 2
    print(
        f"wrote {path} ({sum(p.numel() for p in tokenizer.parameters()) / 1e6:.1f}M parameters, "
        f"{describe_weights(tokenizer.weights_record)})"
    )
    return 0
