"""`flowmo fetch-weights [lpips|resnet|inception|official-lo|official-hi|all]`: fill the caches (on a login node
with internet) and say where each file went; compute nodes then run with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import argparse
import sys

from flowmo.errors import UserError
from flowmo.pretrained import GROUPS, fetch_group, lpips_heads_folder


def parser(command: str = "fetch-weights") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowmo fetch-weights", allow_abbrev=False,
                                     description="download pretrained files into their usual caches (hash checked)")
    parser.add_argument("groups", nargs="*", default=["all"], choices=list(GROUPS), metavar="GROUP",
                        help=f"what to fetch: {', '.join(GROUPS)} (default all)")
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        for group in args.groups:
            for spec, path in fetch_group(group):
                print(f"{spec.key:<14} {path}   ({spec.what}; from {spec.address})")
    except UserError as error:
        print(f"flowmo fetch-weights: {error}", file=sys.stderr)
        return 2
    if "lpips" in args.groups or "all" in args.groups:
        print(f"{'lpips heads':<14} shipped inside the lpips package ({lpips_heads_folder()})")
    return 0
