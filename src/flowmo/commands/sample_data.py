"""`flowmo sample-data --out data/sample`: the embedded sample set (flowmo.data.sample_set), offline, in seconds."""

from __future__ import annotations

import argparse
from pathlib import Path


def parser(command: str = "sample-data") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowmo sample-data",
        allow_abbrev=False,
        description="Build the embedded sample shards from scikit-image's photographs.",
    )
    parser.add_argument("--out", default="data/sample", help="output directory (default data/sample)")
    parser.add_argument("--size", type=int, default=128, help="side of the stored square crops in px (default 128)")
    parser.add_argument("--train-crops", type=int, default=64, help="crops per train photograph (default 64)")
    parser.add_argument("--val-crops", type=int, default=16, help="crops per val photograph (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the crop positions (default 0)")
    return parser


def run(args: argparse.Namespace) -> int:
    from flowmo.data.sample_set import build_sample_set  # here, not above: --help answers before PIL and torch load

    manifests = build_sample_set(
        args.out,
        size=args.size,
        train_crops_per_photo=args.train_crops,
        val_crops_per_photo=args.val_crops,
        seed=args.seed,
    )
    for split, manifest in manifests.items():
        print(
            f"{split}: {manifest['num_samples']} images of {args.size}px in {manifest['num_shards']} shards "
            f"-> {Path(args.out) / (split + '.json')}"
        )
    return 0
