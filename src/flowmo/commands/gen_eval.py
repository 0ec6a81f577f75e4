"""`flowmo gen-eval --generator G.ckpt --tokenizer lo --reference data/imagenet/train.json --out report.json`: gFID /
IS / precision / recall of a generator decoded by its tokenizer (the protocol is flowmo.generate.evaluate's)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flowmo.commands.options import add_sampler


def parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowmo gen-eval",
        allow_abbrev=False,
        description="gFID / IS / precision / recall of a generator decoded by its tokenizer -> a JSON report",
    )
    parser.add_argument("--generator", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--reference", required=True, help="the training image shards' manifest (flowmo shards)")
    parser.add_argument("--cache", default=None, help="reference statistics file (default: beside --out)")
    parser.add_argument("--num-samples", type=int, default=50_000)
    parser.add_argument(
        "--features",
        default=None,
        help="Inception weight file or folder (default: cached, else downloaded); 'random' = stand-in",
    )
    parser.add_argument("--out", required=True, help="report .json")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--cfg", type=float, default=None)
    add_sampler(parser, steps=False)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--devices", default="auto")
    return parser


def run(args: argparse.Namespace) -> int:
    # here, not above: --help answers before torch and Lightning load
    import torch

    from flowmo.errors import UserError
    from flowmo.generate.evaluate import GenerationFeatures, reference_statistics, write_report
    from flowmo.generate.gen_eval import sample_and_measure
    from flowmo.generate.sample import load_generator
    from flowmo.generate.tokens import check_same_tokenizer
    from flowmo.tools import load_tokenizer

    out = Path(args.out)
    try:
        generator = load_generator(args.generator, "cpu")
        tokenizer = load_tokenizer(args.tokenizer, "cpu")
        check_same_tokenizer(generator.tokenizer_sha256, tokenizer, "the generator's training tokens")
        features = (
            GenerationFeatures.stand_in() if args.features == "random" else GenerationFeatures.inception(args.features)
        )
        device = "cuda" if torch.cuda.is_available() and args.accelerator in ("auto", "gpu", "cuda") else "cpu"
        reference = reference_statistics(
            args.reference,
            features.to(device),
            tokenizer.config.image_size,
            args.cache or out.with_name("reference_stats.pt"),
            args.batch,
        )
        devices = int(args.devices) if args.devices.isdigit() else args.devices
        report = sample_and_measure(
            generator,
            tokenizer,
            features,
            reference,
            args.num_samples,
            args.batch,
            dict(steps=args.steps, cfg=args.cfg),
            args.sampler,
            args.seed,
            out.with_name(out.stem + "-features"),
            args.accelerator,
            devices,
        )
    except (UserError, ValueError) as error:  # a missing Inception file is a UserError too
        print(f"flowmo gen-eval: {error}", file=sys.stderr)
        return 2
    if report is None:
        return 0
    report["settings"] = {key: value for key, value in vars(args).items() if key != "out"}
    path = write_report(report, out)
    stand_in = " (RANDOM STAND-IN FEATURES: these numbers mean nothing)" if features.is_stand_in else ""
    print(
        f"gFID {report['gfid']:.3f}  IS {report['inception_score']:.2f}  precision {report['precision']:.3f}  "
        f"recall {report['recall']:.3f}{stand_in} -> {path}"
    )
    return 0
