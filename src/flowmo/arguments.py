"""Command-line arguments of the project subcommands whose work needs torch (`flowmo demo`, `flowmo reconstruct |
tokenize | detokenize`), kept apart from that work: `--help` and argument errors answer before torch is imported
(under a second instead of several)."""

from __future__ import annotations

import argparse

DEVICE_HELP = "auto (cuda when available, else cpu), cpu, cuda, cuda:1"
DEMO_DESCRIPTION = "`flowmo demo` / `make demo`: the whole pipeline on a CPU in minutes, on photos the model never saw."


def demo_arguments(argv: list[str] | None) -> argparse.Namespace:
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
    parser.add_argument("--colour-jitter", type=float, default=0.5, metavar="TINT_GREY",
                        help="random hue/saturation of every training crop, and this probability of tinting a "
                             "grayscale crop; negative turns the jitter off (held-out crops are never changed)")
    parser.add_argument("--fit-1a", action="append", default=[], metavar="ARG",
                        help="extra `flowmo fit` arguments for Stage 1A, e.g. --fit-1a=--model.lr=2e-3 (repeatable)")
    parser.add_argument("--fit-1b", action="append", default=[], metavar="ARG",
                        help="extra `flowmo fit` arguments for Stage 1B (repeatable)")
    parser.add_argument("--feature-weights", choices=("auto", "pretrained", "none"), default="auto",
                        help="auto: the paper's LPIPS-VGG / ResNet-50 losses when their files are cached, else the "
                             "demo's substitutes (said loudly); pretrained: require the files; none: substitutes")
    parser.add_argument("--rows", type=int, default=9, help="held-out images in the grid")
    return parser.parse_args(argv)


def tool_arguments(argv: list[str] | None, command: str) -> argparse.Namespace:
    what = {"reconstruct": "images or folders -> input | reconstruction PNGs",
            "tokenize": "images or folders -> one .npy of token ids per image",
            "detokenize": ".npy id files or folders -> decoded PNGs"}[command]
    parser = argparse.ArgumentParser(prog=f"flowmo {command}", description=what, allow_abbrev=False)
    parser.add_argument("inputs", nargs="+", help="files or folders")
    parser.add_argument("--tokenizer", required=True, help="a .ckpt, an exported .pt, flowmo_lo/hi.pth, or a released name: lo, hi")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--size", type=int, help="image side in px (default: the tokenizer's training size)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--sampler", choices=("paper", "fast"), default="paper",
                        help="paper: 25 steps, rho 4, CFG 1.5 on the interval (31 NFE); fast: 8 such steps (10 NFE)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps instead of the named sampler's")
    parser.add_argument("--seed", type=int, default=0, help="seeds the decoding noise")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    return parser.parse_args(argv)


# ---- generation side: `flowmo pretokenize | generate | gen-eval` (their work imports torch and Lightning)


def pretokenize_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="flowmo pretokenize", allow_abbrev=False,
                                     description="encode every image of an image-shard split once into token shards")
    parser.add_argument("--tokenizer", required=True, help="a .ckpt, an exported .pt, flowmo_lo/hi.pth, or a released name: lo, hi")
    parser.add_argument("--shards", required=True, help="the image shards' manifest (flowmo shards) or a glob")
    parser.add_argument("--out", required=True, help="output folder for {split}-NNNNNN.tar and {split}.json")
    parser.add_argument("--split", default="train", help="split name of the token shards (default train)")
    parser.add_argument("--crops", default="center", help="'center' or N random crops per image (default center)")
    parser.add_argument("--size", type=int, default=None, help="crop side in px (default: the tokenizer's)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random crops")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, gpu, cpu")
    parser.add_argument("--devices", default="auto", help="devices (ranks) to split the shards over")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def generate_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="flowmo generate", allow_abbrev=False,
                                     description="class-conditional samples from a MaskGIT generator, decoded by "
                                                 "its tokenizer")
    parser.add_argument("--generator", required=True, help="a MaskGITModule checkpoint (flowmo gen fit)")
    parser.add_argument("--tokenizer", required=True, help="the tokenizer that wrote its training tokens")
    parser.add_argument("--classes", required=True, help="comma-separated class indices, e.g. 1,2,3")
    parser.add_argument("--per-class", type=int, default=4)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=None, help="decoding steps (default: the generator's)")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--choice-temperature", type=float, default=None)
    parser.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--sampler", choices=("paper", "fast"), default="paper", help="the tokenizer's decoder")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    return parser.parse_args(argv)


def gen_eval_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="flowmo gen-eval", allow_abbrev=False,
                                     description="gFID / IS / precision / recall of a generator decoded by its "
                                                 "tokenizer -> a JSON report")
    parser.add_argument("--generator", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--reference", required=True, help="the training image shards' manifest (flowmo shards)")
    parser.add_argument("--cache", default=None, help="reference statistics file (default: beside --out)")
    parser.add_argument("--num-samples", type=int, default=50_000)
    parser.add_argument("--features", default=None,
                        help="Inception weight file or folder (default: cached, else downloaded); 'random' = stand-in")
    parser.add_argument("--out", required=True, help="report .json")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--cfg", type=float, default=None)
    parser.add_argument("--sampler", choices=("paper", "fast"), default="paper", help="the tokenizer's decoder")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--devices", default="auto")
    return parser.parse_args(argv)
