"""`flowmo shards --source PATH --out DIR --split NAME`: WebDataset shards of an image folder or the ILSVRC2012
tars; `--val-fraction F` instead of `--split` writes DIR/train.json and DIR/val.json from one folder (split by class
folder, deterministically). flowmo.data.shards has the format and the work."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parser(command: str = "shards") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowmo shards",
        allow_abbrev=False,
        description="Write WebDataset shards (original image bytes + class) from a source.",
    )
    parser.add_argument("--source", required=True, help="ImageFolder directory, or ILSVRC2012_img_{train,val}.tar")
    parser.add_argument("--out", required=True, help="output directory for {split}-NNNNNN.tar and {split}.json")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--split", help="split name used in file names, e.g. train or val")
    which.add_argument(
        "--val-fraction",
        type=float,
        help="split one folder: this fraction of each class folder's images (drawn with --seed) "
        "becomes val, the rest train; writes train.json and val.json",
    )
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--workers", type=int, default=None, help="parallel processes (default: all CPU cores)")
    parser.add_argument(
        "--val-labels",
        default=None,
        help="ILSVRC2012 devkit (.tar.gz or folder) or a `name label` text file; else cls=-1",
    )
    parser.add_argument(
        "--shuffle",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="shuffle items across shards (default: on for train* splits)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle and of --val-fraction's draw")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def run(args: argparse.Namespace) -> int:
    from flowmo.data.shards import (  # here, not above: --help answers before the data stack loads
        write_shards,
        write_split_shards,
    )

    try:
        if args.val_fraction is not None:
            if args.val_labels or args.shuffle is not None:
                raise ValueError("--val-fraction splits a folder by its class folders: drop --val-labels / --shuffle")
            manifests = write_split_shards(
                args.source,
                args.out,
                args.val_fraction,
                shard_size=args.shard_size,
                workers=args.workers,
                seed=args.seed,
                progress=not args.no_progress,
            )
        else:
            manifests = {
                args.split: write_shards(
                    args.source,
                    args.out,
                    args.split,
                    shard_size=args.shard_size,
                    workers=args.workers,
                    val_labels=args.val_labels,
                    shuffle=args.shuffle,
                    seed=args.seed,
                    progress=not args.no_progress,
                )
            }
    except (FileNotFoundError, ValueError) as error:
        print(f"flowmo shards: error: {error}", file=sys.stderr)
        return 2
    for split, manifest in manifests.items():
        report(manifest, Path(args.out) / f"{split}.json")
    return 0


def report(manifest: dict, path: Path) -> None:
    """The counts, then every skipped file and why (they are in the manifest too)."""
    for entry in manifest["skipped"]:
        print(f"skipped {entry['path']}: {entry['reason']}", file=sys.stderr)
    print(
        f"{manifest['num_samples']} samples in {manifest['num_shards']} shards, {manifest['num_skipped']} skipped "
        f"-> {path}"
    )
