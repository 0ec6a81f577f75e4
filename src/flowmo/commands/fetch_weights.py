"""`flowmo fetch-weights [lpips|resnet|inception|official-lo|official-hi|all]`: fill the caches (on a login node
with internet), going on past a failure, and end with a table of what is where; compute nodes then run with
HF_HUB_OFFLINE=1. Exit status 2 if any file failed."""

from __future__ import annotations

import argparse
import sys

from flowmo.errors import UserError
from flowmo.pretrained import FILES, GROUPS, cached, fetch, lpips_heads_folder


def parser(command: str = "fetch-weights") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowmo fetch-weights",
        allow_abbrev=False,
        description="download pretrained files into their usual caches (hash checked)",
    )
    parser.add_argument(
        "groups",
        nargs="*",
        default=["all"],
        choices=list(GROUPS),
        metavar="GROUP",
        help=f"what to fetch: {', '.join(GROUPS)} (default all)",
    )
    return parser


def fetch_one(key: str) -> tuple[str, str]:
    """(status, where): cached / fetched and the local path, or failed and the address tried (the sentence goes
    to stderr as it happens)."""
    was_cached = cached(FILES[key]) is not None
    try:
        return ("cached" if was_cached else "fetched"), str(fetch(key))
    except UserError as error:
        print(f"flowmo fetch-weights: {error}", file=sys.stderr)
        return "failed", FILES[key].address


def run(args: argparse.Namespace) -> int:
    keys = dict.fromkeys(key for group in args.groups for key in GROUPS[group])  # in order, each once
    rows = [(key, *fetch_one(key)) for key in keys]
    if "lpips" in args.groups or "all" in args.groups:
        rows.append(("lpips heads", "shipped", lpips_heads_folder()))
    print(f"{'file':<14} {'status':<8} where")
    print("\n".join(f"{key:<14} {status:<8} {where}" for key, status, where in rows))
    failed = [key for key, status, _ in rows if status == "failed"]
    if failed:
        print(f"{len(failed)} of {len(keys)} files failed ({', '.join(failed)}): the reasons are on stderr")
    return 2 if failed else 0
