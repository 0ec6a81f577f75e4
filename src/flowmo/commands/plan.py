"""`flowmo plan`: predicted peak training memory per preset, stage, micro-batch, precision and activation
checkpointing, counted on fake tensors on this CPU (flowmo.bench.memory has the method and its limits)."""

from __future__ import annotations

import argparse

PRECISIONS = ("bf16-mixed", "32-true")
CARDS = ("h100-80gb", "a100-80gb", "a100-40gb", "h200")


def parser(command: str = "plan") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowmo plan",
        allow_abbrev=False,
        description=(
            "Predicted peak GPU memory of one rank's training step (GiB), counted on fake tensors: runs on a CPU in "
            "seconds to a minute per row, allocates nothing. Every combination of the values given is a row."
        ),
    )
    parser.add_argument("--preset", nargs="+", default=["lo"], help="lo, hi, small, tiny, cpu-mid, demo")
    parser.add_argument("--stage", nargs="+", default=["1a"], choices=("1a", "1b"))
    parser.add_argument("--batch", nargs="+", type=int, default=[8], help="micro-batch per GPU")
    parser.add_argument("--precision", nargs="+", default=["bf16-mixed"], choices=PRECISIONS)
    parser.add_argument(
        "--checkpointing",
        nargs="+",
        default=["none", "blocks"],
        help="--model.activation_checkpointing settings: none, blocks, every_K",
    )
    parser.add_argument("--ranks", type=int, default=8, help="DDP ranks (1: no gradient buckets)")
    parser.add_argument("--card", default="h100-80gb", choices=CARDS, help="the reserve column's card")
    return parser


def run(args: argparse.Namespace) -> int:
    from flowmo.bench.memory import plans, recompute_flops, table  # here: --help answers before torch loads

    rows = plans(args.preset, args.stage, args.batch, args.precision, args.checkpointing, args.ranks)
    print(table(rows, args.card))
    for setting in args.checkpointing:
        if setting != "none":
            costs = ", ".join(
                f"{preset} {stage} +{100 * recompute_flops(preset, stage, setting):.0f}%"
                for preset in args.preset
                for stage in args.stage
            )
            print(f"recomputation with {setting}: {costs} FLOPs per training step (counted, loss nets included)")
    return 0
