"""`flowmo COMMAND`: the one registry of commands. Each command module owns its arguments and its work:

- `parser(command) -> argparse.ArgumentParser` and `run(args) -> int`, importing torch, Lightning and the rest
  inside `run` only, so `flowmo COMMAND --help` and argument errors answer before torch loads (tens of
  milliseconds, not seconds);
- or `main(argv, command) -> int` for the LightningCLI commands (fit, validate, test, gen), which parse themselves.
"""

from __future__ import annotations

import sys
from importlib import import_module

# name -> (module under flowmo.commands, one line of help). Training and evaluation first, as `flowmo --help` shows.
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("lightning", "train (Stage 1A or 1B, chosen by the configs); --ckpt_path last resumes"),
    "validate": ("lightning", "validation loop of a checkpoint"),
    "test": ("lightning", "evaluation of a checkpoint (configs/eval/paper.yaml: the paper's protocol)"),
    "plan": ("plan", "predicted peak training memory per preset, stage, micro-batch, precision, checkpointing"),
    "shards": ("shards", "write WebDataset shards from ImageNet or an image folder"),
    "sample-data": ("sample_data", "build the embedded sample set (demo and tests)"),
    "export": ("export", "export a light tokenizer file (config + EMA or raw weights) from a checkpoint"),
    "fetch-weights": (
        "fetch_weights",
        "download pretrained files (LPIPS, ResNet-50, Inception, lo, hi) into their caches",
    ),
    "demo": ("demo", "tiny end-to-end run on the sample set: 1A, 1B, evaluation, grid, metrics.json"),
    "ablate": ("ablate", "ablation grids (configs/ablations/*.yaml): grids, list, run (fit + test), table"),
    "reconstruct": ("files", "images or folders -> input | reconstruction PNGs"),
    "tokenize": ("files", "images or folders -> one .npy of token ids per image"),
    "detokenize": ("files", ".npy token id files -> decoded PNGs"),
    "pretokenize": ("pretokenize", "image shards -> token shards for a generator (+ manifest)"),
    "gen": ("lightning", "MaskGIT generator on token shards: gen fit | gen validate (LightningCLI)"),
    "generate": ("generate", "a generator + its tokenizer -> sample PNGs and a grid"),
    "gen-eval": ("gen_eval", "gFID / IS / precision / recall of a generator -> report JSON"),
}
LIGHTNING = ("fit", "validate", "test")
# Lightning subcommands FlowMo leaves out on purpose, and what to run instead.
ABSENT = {
    "predict": "there is no `flowmo predict` (a tokenizer has no forward to predict with); reconstruct images "
    "with `flowmo reconstruct --tokenizer CKPT FOLDER --out DIR` (tokenize / detokenize for ids)."
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print_overview()
        return 0 if argv else 2
    name = argv[0]
    if name in ABSENT:
        print(f"flowmo: {ABSENT[name]}", file=sys.stderr)
        return 2
    if name not in COMMANDS:
        print(f"flowmo: unknown command {name!r}; `flowmo --help` lists them.", file=sys.stderr)
        return 2
    module = import_module(f"flowmo.commands.{COMMANDS[name][0]}")
    if hasattr(module, "main"):
        return int(module.main(argv[1:] if name not in LIGHTNING else argv, name) or 0)
    args = module.parser(name).parse_args(argv[1:])
    args.command = name
    return int(module.run(args) or 0)


def print_overview() -> None:
    print("usage: flowmo COMMAND [options]   (`flowmo COMMAND --help` lists a command's options)\n")
    print("training and evaluation (Lightning; configs with -c FILE, any option as --section.key value):")
    print("\n".join(f"  {name:<14} {COMMANDS[name][1]}" for name in LIGHTNING))
    print("\nproject commands:")
    print("\n".join(f"  {name:<14} {text}" for name, (_, text) in COMMANDS.items() if name not in LIGHTNING))
