"""`flowmo demo` / `make demo`: the whole pipeline on a CPU in minutes, on photos the model never saw (the work is
flowmo.demo's)."""

from __future__ import annotations

import argparse

DEMO_DESCRIPTION = "`flowmo demo` / `make demo`: the whole pipeline on a CPU in minutes, on photos the model never saw."


def parser(command: str = "demo") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowmo demo", description=DEMO_DESCRIPTION, allow_abbrev=False)
    parser.add_argument("--out", default="results/demo", help="where grid.png, curves.png and metrics.json go")
    parser.add_argument("--data", default="data/demo", help="demo sample shards (built here if missing or stale)")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--seed", type=int, default=0, help="seeds the model init, the data order and the noise")
    parser.add_argument("--steps-1a", type=int, default=5000)
    parser.add_argument("--steps-1b", type=int, default=800)
    parser.add_argument("--lr-1b", type=float, default=1e-3)
    parser.add_argument("--batch-1b", type=int, default=8, help="Stage-1B batch (each sample runs an 8-step chain)")
    parser.add_argument("--val-every", type=int, default=500, help="Stage-1A steps between validations (curves)")
    parser.add_argument("--val-every-1b", type=int, default=100, help="Stage-1B steps between validations")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--train-crops", type=int, default=600, help="crops per training photograph")
    parser.add_argument("--val-crops", type=int, default=16, help="crops per held-out photograph")
    parser.add_argument(
        "--colour-jitter",
        type=float,
        default=0.5,
        metavar="TINT_GREY",
        help="random hue/saturation of every training crop, and this probability of tinting a "
        "grayscale crop; negative turns the jitter off (held-out crops are never changed)",
    )
    parser.add_argument(
        "--fit-1a",
        action="append",
        default=[],
        metavar="ARG",
        help="extra `flowmo fit` arguments for Stage 1A, e.g. --fit-1a=--model.optim.lr=2e-3 (repeatable)",
    )
    parser.add_argument(
        "--fit-1b",
        action="append",
        default=[],
        metavar="ARG",
        help="extra `flowmo fit` arguments for Stage 1B (repeatable)",
    )
    parser.add_argument(
        "--feature-weights",
        choices=("auto", "pretrained", "none"),
        default="auto",
        help="auto: the paper's LPIPS-VGG / ResNet-50 losses when their files are cached, else the "
        "demo's substitutes (said loudly); pretrained: require the files; none: substitutes",
    )
    parser.add_argument("--rows", type=int, default=9, help="held-out images in the grid")
    return parser


def run(args: argparse.Namespace) -> int:
    from flowmo.demo import run_demo  # here, not above: --help answers before torch and Lightning load

    return run_demo(args)
