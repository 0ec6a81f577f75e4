"""`flowmo` command line: LightningCLI for fit / validate / test, plus the project's own subcommands.

    flowmo fit -c configs/base.yaml -c configs/model/lo.yaml -c configs/stage/1a.yaml -c configs/data/imagenet.yaml
    flowmo fit ... --ckpt_path last          # resume the same stage from its newest readable checkpoint
    flowmo test -c ... --ckpt_path runs/lo-1b/checkpoints/last.ckpt
    flowmo shards --source /data/ILSVRC2012_img_val.tar --out data/imagenet --split val
    flowmo sample-data --out data/sample
    flowmo export --ckpt runs/lo-1b/checkpoints/last.ckpt --out flowmo_lo.pt
    flowmo reconstruct --tokenizer flowmo_lo.pt photos/ --out recon/    # also: flowmo tokenize / detokenize
    flowmo demo
    flowmo pretokenize --tokenizer lo --shards data/imagenet/train.json --out data/tokens-lo
    flowmo gen fit -c configs/generator/base.yaml -c configs/generator/paper.yaml   # MaskGIT on those tokens
    flowmo generate --generator runs/gen/checkpoints/last.ckpt --tokenizer lo --classes 1,2 --out samples

`run_name` names the run: TensorBoard logs under runs/<run_name>/, checkpoints in runs/<run_name>/checkpoints
(stable across restarts, so `--ckpt_path last` finds them), the resolved config beside them.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

# Nothing heavy at import time: torch and Lightning load only for the command that needs them, so `flowmo
# --help`, the project subcommands' --help and their argument errors answer in well under a second.
LIGHTNING_COMMANDS = {
    "fit": "train (Stage 1A or 1B, chosen by the configs); --ckpt_path last resumes",
    "validate": "validation loop of a checkpoint",
    "test": "evaluation of a checkpoint (configs/eval/paper.yaml: the paper's protocol)",
}

PROJECT_COMMANDS = {
    "shards": ("flowmo.data.shards", "write WebDataset shards from ImageNet or an image folder"),
    "sample-data": ("flowmo.data.sample_set", "build the embedded sample set (demo and tests)"),
    "export": ("flowmo.cli", "export a light tokenizer file (config + EMA or raw weights) from a checkpoint"),
    "fetch-weights": ("flowmo.pretrained", "download pretrained files (LPIPS, ResNet-50, Inception, lo, hi) into "
                                           "their caches"),
    "demo": ("flowmo.demo", "tiny end-to-end run on the sample set: 1A, 1B, evaluation, grid, metrics.json"),
    "ablate": ("flowmo.ablate", "ablation grids (configs/ablations/*.yaml): grids, list, run (fit + test), table"),
    "reconstruct": ("flowmo.tools", "images or folders -> input | reconstruction PNGs"),
    "tokenize": ("flowmo.tools", "images or folders -> one .npy of token ids per image"),
    "detokenize": ("flowmo.tools", ".npy token id files -> decoded PNGs"),
    "pretokenize": ("flowmo.generate.pretokenize", "image shards -> token shards for a generator (+ manifest)"),
    "gen": ("flowmo.generate.cli", "MaskGIT generator on token shards: gen fit | gen validate (LightningCLI)"),
    "generate": ("flowmo.generate.sample", "a generator + its tokenizer -> sample PNGs and a grid"),
    "gen-eval": ("flowmo.generate.gen_eval", "gFID / IS / precision / recall of a generator -> report JSON"),
}

# Commands whose parser lives in flowmo.arguments and whose module has run(args): parsed before the module loads.
LIGHT_PARSERS = {"pretokenize": "pretokenize_arguments", "generate": "generate_arguments",
                 "gen-eval": "gen_eval_arguments"}


def export_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="flowmo export", description=PROJECT_COMMANDS["export"][1])
    parser.add_argument("--ckpt", required=True, help="a FlowMoModule .ckpt, an official flowmo_*.pth, or lo / hi")
    parser.add_argument("--out", required=True, help="where to write the .pt file")
    parser.add_argument("--weights", choices=("ema", "raw"), default="ema")
    args = parser.parse_args(argv)
    from flowmo.checkpoint import export_tokenizer
    from flowmo.nn.tokenizer import FlowMoTokenizer

    from flowmo.errors import UserError

    try:
        tokenizer = FlowMoTokenizer.from_checkpoint(args.ckpt, weights=args.weights)
    except UserError as error:
        print(f"flowmo export: {error}", file=sys.stderr)
        return 2
    path = export_tokenizer(tokenizer, args.out)
    print(f"wrote {path} ({sum(p.numel() for p in tokenizer.parameters()) / 1e6:.1f}M parameters, {args.weights} weights)")
    return 0


def print_overview() -> None:
    print("usage: flowmo COMMAND [options]   (`flowmo COMMAND --help` lists a command's options)\n")
    print("training and evaluation (Lightning; configs with -c FILE, any option as --section.key value):")
    print("\n".join(f"  {name:<12} {text}" for name, text in LIGHTNING_COMMANDS.items()))
    print("\nproject subcommands:")
    print("\n".join(f"  {name:<12} {text}" for name, (_, text) in PROJECT_COMMANDS.items()))


def __getattr__(name: str):
    """FlowMoCLI and its helpers live in flowmo.lightning_cli; `from flowmo.cli import FlowMoCLI` still works."""
    if name in ("FlowMoCLI", "ARCHITECTURE_HPARAMS"):
        return getattr(import_module("flowmo.lightning_cli"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: list[str] | None = None) -> int:
    explicit = argv is not None
    argv = list(argv if explicit else sys.argv[1:])
    if argv and argv[0] in PROJECT_COMMANDS:
        command, rest = argv[0], argv[1:]
        if command == "export":
            return export_main(rest)
        if PROJECT_COMMANDS[command][0] == "flowmo.tools":  # arguments first: --help and mistakes answer before torch loads
            args = import_module("flowmo.arguments").tool_arguments(rest, command)
            return int(import_module("flowmo.tools").run(args, command) or 0)
        if command == "demo":
            args = import_module("flowmo.arguments").demo_arguments(rest)
            return int(import_module("flowmo.demo").run(args) or 0)
        if command in LIGHT_PARSERS:
            args = getattr(import_module("flowmo.arguments"), LIGHT_PARSERS[command])(rest)
            return int(import_module(PROJECT_COMMANDS[command][0]).run(args) or 0)
        return int(import_module(PROJECT_COMMANDS[command][0]).main(rest) or 0)
    if not argv or argv[0] in ("-h", "--help"):
        print_overview()
        return 0 if argv else 2
    from flowmo.lightning_cli import FlowMoCLI
    from flowmo.pretrained import MissingWeightsError

    try:
        FlowMoCLI(args=argv if explicit else None)
    except MissingWeightsError as error:  # a set-up problem, not a bug: the sentence, without a traceback
        print(f"error: {error} On the command line: --model.feature_weights DIR (a folder holding the .pth "
              "files) or --model.inception_path FILE.", file=sys.stderr)
        return 2
    except BaseException as error:  # noqa: BLE001 - only the faults a user acts on are mapped, others re-raise
        from flowmo.faults import exit_code_for

        if isinstance(error, argparse.ArgumentError):  # a mistyped option or a bad value in a config file
            subcommand = argv[0] if argv and not argv[0].startswith("-") else "fit"
            print(f"error: {error}. `flowmo {subcommand} --help` lists every option.", file=sys.stderr)
            return 2
        mapped = exit_code_for(error)
        if mapped is None:
            raise
        code, sentence = mapped
        if sentence:
            print(f"error: {sentence}", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
