"""`flowmo gen fit|validate`: LightningCLI for the MaskGIT generator, the same shape as `flowmo fit`.

    flowmo pretokenize --tokenizer runs/demo-1b/checkpoints/last.ckpt --shards data/sample/train.json --out data/tokens
    flowmo gen fit -c configs/generator/base.yaml -c configs/generator/tiny.yaml
    flowmo gen fit ... --ckpt_path last                 # resume from runs/<run_name>/checkpoints

The model's token layout (tokens, sub-tokens, codebook, classes) and the tokenizer hash come from the data's
token manifest (linked at instantiation), so a config names the architecture and the data, never the layout.
"""

from __future__ import annotations

import argparse
import sys

from lightning.pytorch.cli import LightningCLI

from flowmo.cli import FlowMoCLI
from flowmo.errors import UserError
from flowmo.generate.data import TokenDataModule
from flowmo.generate.module import MaskGITModule


class GeneratorCLI(FlowMoCLI):
    """FlowMoCLI's run folders, checkpointing, atomic saves and TensorBoard logger, for the generator."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf", "allow_abbrev": False, "exit_on_error": False})
        LightningCLI.__init__(self, MaskGITModule, TokenDataModule, *args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit and validate; sampling is `flowmo generate`."""
        return {name: keys for name, keys in LightningCLI.subcommands().items() if name in ("fit", "validate")}

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.link_arguments("data.token_layout", "model.token_layout", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        """No tokenizer-architecture checks: the generator's shape comes from its token manifest."""

    def _parse_ckpt_path(self) -> None:
        if self.config.get("subcommand") == "fit":
            self._resolve_last()
        return LightningCLI._parse_ckpt_path(self)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("fit", "validate", "-h", "--help"):
        print("usage: flowmo gen fit|validate -c configs/generator/base.yaml -c configs/generator/tiny.yaml [...]",
              file=sys.stderr)
        return 2
    try:
        GeneratorCLI(args=argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except argparse.ArgumentError as error:
        print(f"error: {error}. `flowmo gen {argv[0]} --help` lists every option.", file=sys.stderr)
        return 2
    return 0
