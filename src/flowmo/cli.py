"""`flowmo` command line: LightningCLI for fit / validate / test, plus the project's own subcommands.

    flowmo fit -c configs/base.yaml -c configs/model/lo.yaml -c configs/stage/1a.yaml -c configs/data/imagenet.yaml
    flowmo fit ... --ckpt_path last          # resume the same stage from its newest readable checkpoint
    flowmo test -c ... --ckpt_path runs/lo-1b/checkpoints/last.ckpt
    flowmo shards --source /data/ILSVRC2012_img_val.tar --out data/imagenet --split val
    flowmo sample-data --out data/sample
    flowmo export --ckpt runs/lo-1b/checkpoints/last.ckpt --out flowmo_lo.pt
    flowmo reconstruct --tokenizer flowmo_lo.pt photos/ --out recon/    # also: flowmo tokenize / detokenize
    flowmo demo
    flowmo pretokenize --tokenizer flowmo_lo.pth --shards data/imagenet/train.json --out data/tokens-lo
    flowmo gen fit -c configs/generator/base.yaml -c configs/generator/paper.yaml   # MaskGIT on those tokens
    flowmo generate --generator runs/gen/checkpoints/last.ckpt --tokenizer flowmo_lo.pth --classes 1,2 --out samples

`run_name` names the run: TensorBoard logs under runs/<run_name>/, checkpoints in runs/<run_name>/checkpoints
(stable across restarts, so `--ckpt_path last` finds them), the resolved config beside them.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from flowmo.data.datamodule import FlowMoDataModule
from flowmo.module import FlowMoModule
from flowmo.perceptual import MissingWeightsError

PROJECT_COMMANDS = {
    "shards": ("flowmo.data.shards", "write WebDataset shards from ImageNet or an image folder"),
    "sample-data": ("flowmo.data.sample_set", "build the embedded sample set (demo and tests)"),
    "export": ("flowmo.cli", "export a light tokenizer file (config + EMA or raw weights) from a checkpoint"),
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


# What a checkpoint decides when it is evaluated: the network's shape. Everything else is the evaluation's.
ARCHITECTURE_HPARAMS = ("preset", "architecture")


class FlowMoCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        # no option abbreviations (--trainer.max_step would silently mean max_steps); parse errors are raised
        # to main(), which prints their one sentence instead of 110 lines of usage
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf", "allow_abbrev": False, "exit_on_error": False})
        super().__init__(FlowMoModule, FlowMoDataModule, *args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit / validate / test. No `predict`: FlowMo has no forward to predict with; the file-level tools
        are `flowmo reconstruct | tokenize | detokenize` (flowmo.tools)."""
        commands = dict(LightningCLI.subcommands())
        commands.pop("predict", None)
        return commands

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run_name", type=str, default="flowmo", help="runs/<run_name>/ holds logs and checkpoints")
        parser.add_argument("--runs_dir", type=str, default="runs")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": -1,
                             "checkpoint.every_n_train_steps": 5000, "checkpoint.filename": "step{step:07d}",
                             "checkpoint.auto_insert_metric_name": False})
        parser.link_arguments(("runs_dir", "run_name"), "checkpoint.dirpath",
                              compute_fn=lambda runs, name: f"{runs}/{name}/checkpoints")
        parser.link_arguments(("runs_dir", "run_name"), "trainer.default_root_dir",
                              compute_fn=lambda runs, name: f"{runs}/{name}")

    def _parse_ckpt_path(self) -> None:
        """`fit --ckpt_path` resumes with the checkpoint's hyper-parameters (Lightning's rule). validate/test
        take only the architecture from it: the evaluation protocol (sampler, metrics, feature weights) is the
        command line's, and a Stage-1B run's init_weights (a 1A file, maybe not on this machine) is not re-read."""
        subcommand = self.config.get("subcommand")
        if subcommand == "fit":
            self._resolve_last()
            self._refuse_other_architecture()
        if subcommand in (None, "fit"):
            return super()._parse_ckpt_path()
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return None
        hparams = _checkpoint_hparams(ckpt_path)
        architecture = {key: hparams[key] for key in ARCHITECTURE_HPARAMS if key in hparams}
        configured = self.config[subcommand].get("model", {}).get("preset")
        if architecture.get("preset") not in (None, configured):
            print(f"flowmo {subcommand}: {ckpt_path} is a {architecture['preset']!r} checkpoint, not the configured "
                  f"{configured!r}; evaluating it as {architecture['preset']!r} (the report says so).", file=sys.stderr)
        if architecture:
            self.config = self.parser.parse_object({subcommand: {"model": architecture}}, self.config)
        return None

    def before_instantiate_classes(self) -> None:
        """Checks that need the whole config: the data's image size must be a multiple of the patch."""
        from flowmo.config import resolve_config
        from flowmo.errors import UserError

        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if not config or "model" not in config or "data" not in config:
            return
        patch = resolve_config(config["model"]["preset"], config["model"].get("architecture")).patch_size
        size = config["data"].get("image_size")
        if size and size % patch:
            raise UserError(f"data.image_size {size} is not a multiple of the patch size {patch}; use "
                            f"{size - size % patch or patch} or {size + patch - size % patch}.")

    def _resolve_last(self) -> None:
        """`--ckpt_path last` = the newest readable checkpoint of this run (last.ckpt, step files, SLURM's
        hpc_ckpt_*), said out loud; with none, a loud note that the run starts from step 0."""
        from flowmo.faults import latest_checkpoint

        config = self.config["fit"]
        if config.get("ckpt_path") != "last":
            return
        run_dir = Path(config["runs_dir"]) / config["run_name"]
        latest = latest_checkpoint(run_dir, report=lambda message: print(message, file=sys.stderr))
        if latest is None:
            print(f"flowmo: --ckpt_path last: no checkpoint in {run_dir} yet; starting from step 0.", file=sys.stderr)
        else:
            print(f"flowmo: resuming from {latest}", file=sys.stderr)
        config["ckpt_path"] = str(latest) if latest else None

    def _refuse_other_architecture(self) -> None:
        """Resuming a checkpoint of another architecture would silently train that one under this run's name."""
        from flowmo.config import config_differences, resolve_config
        from flowmo.errors import UserError

        config = self.config["fit"]
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        hparams = _checkpoint_hparams(ckpt_path)
        if "preset" not in hparams:
            return
        theirs = resolve_config(hparams["preset"], hparams.get("architecture"))
        ours = resolve_config(config["model"]["preset"], config["model"].get("architecture"))
        if theirs != ours:
            raise UserError(f"--ckpt_path {ckpt_path} is a checkpoint of another architecture than the configured one "
                            f"({'; '.join(config_differences(theirs, ours))}); give the configs it was trained with, "
                            "or start a new run_name.")

    def _instantiate_trainer(self, config: dict, callbacks: list):
        """Every run saves checkpoints atomically, turns SIGTERM / SIGUSR1 into a saved, resumable exit and ends
        with last.ckpt at its final step."""
        from flowmo.faults import AtomicCheckpointIO, FinalCheckpoint, Preemption

        if not config.get("plugins"):
            config["plugins"] = [AtomicCheckpointIO()]
        _cpu_runs_fp32(config)
        extra = [Preemption(), FinalCheckpoint()]
        if config.get("enable_progress_bar", True) is not False and self.subcommand == "fit":
            from flowmo.callbacks import StepProgressBar

            extra.append(StepProgressBar())  # optimizer steps, loss and images/s (Lightning's counts micro-batches)
        return super()._instantiate_trainer(config, [*callbacks, *extra])

    def instantiate_trainer(self, **kwargs):
        """Default logger: TensorBoard under runs/<run_name>/version_N (a config may name another logger)."""
        if self._get(self.config_init, "trainer", default={}).get("logger") in (None, True):
            from lightning.pytorch.loggers import TensorBoardLogger

            kwargs["logger"] = TensorBoardLogger(save_dir=self._get(self.config_init, "runs_dir"),
                                                 name=self._get(self.config_init, "run_name"))
        return super().instantiate_trainer(**kwargs)


def _checkpoint_hparams(path: str) -> dict:
    """A Lightning checkpoint's hyper-parameters; mmap reads them without loading gigabytes of weights."""
    return torch.load(path, weights_only=True, map_location="cpu", mmap=True).get("hyper_parameters", {})


def _cpu_runs_fp32(config: dict) -> None:
    """bf16-mixed (the paper's GPU precision, base.yaml) on a machine or run without CUDA becomes fp32: CPU
    autocast to bf16 was reported 3-4x slower per step than fp32 (issue 11). Said once; GPU runs keep bf16."""
    on_cpu = config.get("accelerator") == "cpu" or not torch.cuda.is_available()
    if on_cpu and str(config.get("precision")) in ("bf16-mixed", "bf16", "16-mixed", "16"):
        print(f"flowmo: precision {config['precision']} on a CPU runs slower than fp32; using 32-true.", file=sys.stderr)
        config["precision"] = "32-true"


def export_main(argv: list[str]) -> int:
    from flowmo.checkpoint import export_tokenizer
    from flowmo.nn.tokenizer import FlowMoTokenizer

    parser = argparse.ArgumentParser(prog="flowmo export", description=PROJECT_COMMANDS["export"][1])
    parser.add_argument("--ckpt", required=True, help="a FlowMoModule .ckpt or an official flowmo_*.pth")
    parser.add_argument("--out", required=True, help="where to write the .pt file")
    parser.add_argument("--weights", choices=("ema", "raw"), default="ema")
    args = parser.parse_args(argv)
    tokenizer = FlowMoTokenizer.from_checkpoint(args.ckpt, weights=args.weights)
    path = export_tokenizer(tokenizer, args.out)
    print(f"wrote {path} ({sum(p.numel() for p in tokenizer.parameters()) / 1e6:.1f}M parameters, {args.weights} weights)")
    return 0


def main(argv: list[str] | None = None) -> int:
    explicit = argv is not None
    argv = list(argv if explicit else sys.argv[1:])
    if argv and argv[0] in PROJECT_COMMANDS:
        command, rest = argv[0], argv[1:]
        if command == "export":
            return export_main(rest)
        if PROJECT_COMMANDS[command][0] == "flowmo.tools":
            return int(import_module("flowmo.tools").main(rest, command=command) or 0)
        return int(import_module(PROJECT_COMMANDS[command][0]).main(rest) or 0)
    if argv and argv[0] in ("-h", "--help"):
        print("project subcommands:\n" + "\n".join(f"  {k:<12} {v[1]}" for k, v in PROJECT_COMMANDS.items()))
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
