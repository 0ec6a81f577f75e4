"""`flowmo shards --source PATH --out DIR --split NAME`: WebDataset shards of an image folder or the ILSVRC2012
tars (flowmo.data.shards has the format and the work)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parser(command: str = "shards") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowmo shards", allow_abbrev=False,
                                     description="Write WebDataset shards (original image bytes + class) from a source.")
    parser.add_argument("--source", required=True, help="ImageFolder directory, or ILSVRC2012_img_{train,val}.tar")
    parser.add_argument("--out", required=True, help="output directory for {split}-NNNNNN.tar and {split}.json")
    parser.add_argument("--split", required=True, help="split name used in file names, e.g. train or val")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--workers", type=int, default=None, help="parallel processes (default: all CPU cores)")
    parser.add_argument("--val-labels", default=None,
                        help="ILSVRC2012 devkit (.tar.gz or folder) or a `name label` text file; else cls=-1")
    parser.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=None,
                        help="shuffle items across shards (default: on for train* splits)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def run(args: argparse.Namespace) -> int:
    from flowmo.data.shards import (
        write_shards,  # here, not above: --help answers before the data stack loads
    )

    try:
        manifest = write_shards(
            args.source, args.out, args.split, shard_size=args.shard_size, workers=args.workers,
            val_labels=args.val_labels, shuffle=args.shuffle, seed=args.seed, progress=not args.no_progress,
        )
    except (FileNotFoundError, ValueError) as error:
        print(f"flowmo shards: error: {error}", file=sys.stderr)
        return 2
    print(f"{manifest['num_samples']} samples in {manifest['num_shards']} shards, {manifest['num_skipped']} skipped "
          f"-> {Path(args.out) / (args.split + '.json')}")
    return 0
