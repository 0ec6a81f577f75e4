"""`flowmo fit | validate | test` (the tokenizer) and `flowmo gen fit | validate` (the MaskGIT generator): Lightning's
CLI on one base with this project's run folders, checks and defaults.

    flowmo fit -c configs/base.yaml -c configs/model/lo.yaml -c configs/stage/1a.yaml -c configs/data/imagenet.yaml
    flowmo fit ... --ckpt_path last          # resume the same stage from its newest readable checkpoint
    flowmo test -c ... --ckpt_path runs/lo-1b/checkpoints/last.ckpt
    flowmo gen fit -c configs/generator/base.yaml -c configs/generator/tiny.yaml

`run_name` names the run: TensorBoard logs under runs/<run_name>/, checkpoints in runs/<run_name>/checkpoints
(stable across restarts, so `--ckpt_path last` finds them), the resolved config beside them. Every run saves
checkpoints atomically, turns SIGTERM / SIGUSR1 into a saved, resumable exit and ends with last.ckpt at its final
step (flowmo.faults). A run directory holds one run written by one process: a second start of a run is refused
unless it resumes (--ckpt_path) or starts over (--overwrite), and a requeued job resumes (flowmo.run_dir).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from jsonargparse import ActionYesNo
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from flowmo.callbacks import StepProgressBar
from flowmo.checkpoint import load_weights_file
from flowmo.config import config_differences
from flowmo.data.datamodule import FlowMoDataModule
from flowmo.errors import UserError
from flowmo.faults import AtomicCheckpointIO, FinalCheckpoint, Preemption, exit_code_for
from flowmo.generate.data import TokenDataModule
from flowmo.generate.module import MaskGITModule
from flowmo.module import FlowMoModule
from flowmo.presets import resolve_config
from flowmo.pretrained import MissingWeightsError
from flowmo.run_dir import claim, start_of
from flowmo.run_logger import RunLogger

# What a checkpoint decides when it is evaluated: the network's shape. Everything else is the evaluation's.
ARCHITECTURE_HPARAMS = ("preset", "architecture")
PARSER_KWARGS = {"parser_mode": "omegaconf", "allow_abbrev": False, "exit_on_error": False}


class ProjectCLI(LightningCLI):
    """What every run of this project shares: runs/<run_name>/, ModelCheckpoint, `--ckpt_path last`, atomic saves,
    preemption, the final checkpoint, the step progress bar, the TensorBoard logger and one run per run directory."""

    def __init__(self, model_class, datamodule_class, *args, **kwargs):
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        # no option abbreviations (--trainer.max_step would silently mean max_steps); parse errors are raised
        # to main(), which prints their one sentence instead of 110 lines of usage
        kwargs.setdefault("parser_kwargs", PARSER_KWARGS)
        self._run_lock = None  # taken before a fit builds anything (claim), held until the command ends
        try:
            super().__init__(model_class, datamodule_class, *args, **kwargs)
        finally:
            if self._run_lock is not None:
                self._run_lock.release()

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--run_name", type=str, default="flowmo", help="runs/<run_name>/ holds logs and checkpoints"
        )
        parser.add_argument("--runs_dir", type=str, default="runs")
        parser.add_argument(
            "--overwrite",
            action=ActionYesNo,
            default=False,
            help="fit: start runs/<run_name>/ over from step 0, its earlier files moved into "
            "superseded-<time>/ (without it, a run that holds checkpoints only resumes)",
        )
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": -1,
                "checkpoint.every_n_train_steps": 5000,
                "checkpoint.filename": "step{step:07d}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.link_arguments(
            ("runs_dir", "run_name"), "checkpoint.dirpath", compute_fn=lambda runs, name: f"{runs}/{name}/checkpoints"
        )
        parser.link_arguments(
            ("runs_dir", "run_name"), "trainer.default_root_dir", compute_fn=lambda runs, name: f"{runs}/{name}"
        )

    def _run_dir(self) -> Path:
        config = self.config["fit"]
        return Path(config["runs_dir"]) / config["run_name"]

    def _decide_start(self) -> None:
        """fit, while parsing: the checkpoint this start continues (`--ckpt_path last` = the newest state of the run;
        a requeued job resumes it too), resolved before Lightning reads its hyper-parameters. Reads only."""
        config = self.config["fit"]
        self._start = start_of(self._run_dir(), config.get("ckpt_path"), config.get("overwrite"))
        config["ckpt_path"] = self._start.ckpt_path
        config["overwrite"] = False  # done: the run's saved config.yaml, reused later, must not start it over again

    def before_instantiate_classes(self) -> None:
        """fit, before anything is built: the run directory's lock, then a refusal or the earlier files moved aside."""
        if self.subcommand == "fit":
            self._run_lock = claim(self._run_dir(), self._start)

    def _instantiate_trainer(self, config: dict, callbacks: list):
        if not config.get("plugins"):
            config["plugins"] = [AtomicCheckpointIO()]
        _cpu_runs_fp32(config)
        extra = [Preemption(), FinalCheckpoint()]
        if config.get("enable_progress_bar", True) is not False and self.subcommand == "fit":
            extra.append(StepProgressBar())  # optimizer steps, loss and images/s (Lightning's counts micro-batches)
        return super()._instantiate_trainer(config, [*callbacks, *extra])

    def instantiate_trainer(self, **kwargs):
        """Default logger: TensorBoard under runs/<run_name>/version_N, validate/ or test/ (flowmo.run_logger; a
        config may name another logger)."""
        if self._get(self.config_init, "trainer", default={}).get("logger") in (None, True):
            kwargs["logger"] = RunLogger(
                save_dir=self._get(self.config_init, "runs_dir"),
                name=self._get(self.config_init, "run_name"),
                subcommand=self.subcommand,
            )
        return super().instantiate_trainer(**kwargs)

    def parse_arguments(self, parser, args) -> None:
        """Lightning's, without its warning about `args` given beside sys.argv: main() always passes the argv it
        was given (for `flowmo gen fit`, what follows `gen`), so there is no mix-up to warn about."""
        self.config = parser.parse_args(args)


class FlowMoCLI(ProjectCLI):
    def __init__(self, *args, **kwargs):
        super().__init__(FlowMoModule, FlowMoDataModule, *args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit / validate / test. No `predict`: FlowMo has no forward to predict with; the file-level tools
        are `flowmo reconstruct | tokenize | detokenize`."""
        commands = dict(LightningCLI.subcommands())
        commands.pop("predict", None)
        return commands

    def _parse_ckpt_path(self) -> None:
        """`fit --ckpt_path` resumes with the checkpoint's hyper-parameters (Lightning's rule). validate/test
        take only the architecture from it: the evaluation protocol (sampler, metrics, feature weights) is the
        command line's, and a Stage-1B run's init_weights (a 1A file, maybe not on this machine) is not re-read."""
        subcommand = self.config.get("subcommand")
        if subcommand == "fit":
            self._decide_start()
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
            print(
                f"flowmo {subcommand}: {ckpt_path} is a {architecture['preset']!r} checkpoint, not the configured "
                f"{configured!r}; evaluating it as {architecture['preset']!r} (the report says so).",
                file=sys.stderr,
            )
        if architecture:
            self.config = self.parser.parse_object({subcommand: {"model": architecture}}, self.config)
        return None

    def before_instantiate_classes(self) -> None:
        """Checks that need the whole config: the data's image size must be a multiple of the patch; then the run."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if config and "model" in config and "data" in config:
            patch = resolve_config(config["model"]["preset"], config["model"].get("architecture")).patch_size
            size = config["data"].get("image_size")
            if size and size % patch:
                raise UserError(
                    f"data.image_size {size} is not a multiple of the patch size {patch}; use "
                    f"{size - size % patch or patch} or {size + patch - size % patch}."
                )
        super().before_instantiate_classes()

    def _refuse_other_architecture(self) -> None:
        """Resuming a checkpoint of another architecture would silently train that one under this run's name."""
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
            raise UserError(
                f"--ckpt_path {ckpt_path} is a checkpoint of another architecture than the configured one "
                f"({'; '.join(config_differences(theirs, ours))}); give the configs it was trained with, "
                "or start a new run_name."
            )


class GeneratorCLI(ProjectCLI):
    """The MaskGIT generator: its token layout (tokens, sub-tokens, codebook, classes) and tokenizer hash come from
    the data's token manifest (linked at instantiation), so a config names the architecture and the data."""

    def __init__(self, *args, **kwargs):
        super().__init__(MaskGITModule, TokenDataModule, *args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit and validate; sampling is `flowmo generate`."""
        return {name: keys for name, keys in LightningCLI.subcommands().items() if name in ("fit", "validate")}

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.link_arguments("data.token_layout", "model.token_layout", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        if self.config.get("subcommand") == "fit":
            self._decide_start()
        return LightningCLI._parse_ckpt_path(self)


def main(argv: list[str], command: str) -> int:
    """fit / validate / test get the whole argv (their subcommand first); `gen` gets what follows it."""
    if command == "gen":
        if not argv or argv[0] not in ("fit", "validate", "-h", "--help"):
            print(
                "usage: flowmo gen fit|validate -c configs/generator/base.yaml -c configs/generator/tiny.yaml [...]",
                file=sys.stderr,
            )
            return 2
        return _run_cli(GeneratorCLI, argv, f"gen {argv[0]}")
    return _run_cli(FlowMoCLI, argv, argv[0])


def _run_cli(cli, argv: list[str], name: str) -> int:
    if any(arg.split("=")[0] == "--trainer.default_root_dir" for arg in argv):  # linked to runs_dir / run_name
        print(
            "error: a run's folder is <runs_dir>/<run_name>/: set --runs_dir DIR and --run_name NAME instead of "
            "--trainer.default_root_dir.",
            file=sys.stderr,
        )
        return 2
    try:
        cli(args=argv)
    except MissingWeightsError as error:  # a set-up problem, not a bug: the sentence, without a traceback
        print(
            f"error: {error} On the command line: --model.feature_weights DIR (a folder holding the .pth "
            "files) or --model.eval.inception_path FILE.",
            file=sys.stderr,
        )
        return 2
    except argparse.ArgumentError as error:  # a mistyped option or a bad value in a config file
        print(f"error: {error}. `flowmo {name} --help` lists every option.", file=sys.stderr)
        return 2
    except BaseException as error:  # noqa: BLE001 - only the faults a user acts on are mapped, others re-raise
        mapped = exit_code_for(error)
        if mapped is None:
            raise
        code, sentence = mapped
        if sentence:
            print(f"error: {sentence}", file=sys.stderr)
        return code
    return 0


def _checkpoint_hparams(path: str) -> dict:
    """A Lightning checkpoint's hyper-parameters; mmap reads them without loading gigabytes of weights."""
    return load_weights_file(path, mmap=True).get("hyper_parameters", {})


def _cpu_runs_fp32(config: dict) -> None:
    """bf16-mixed (the paper's GPU precision, base.yaml) on a machine or run without CUDA becomes fp32: CPU
    autocast to bf16 was reported 3-4x slower per step than fp32 (issue 11). Said once; GPU runs keep bf16."""
    on_cpu = config.get("accelerator") == "cpu" or not torch.cuda.is_available()
    if on_cpu and str(config.get("precision")) in ("bf16-mixed", "bf16", "16-mixed", "16"):
        print(
            f"flowmo: precision {config['precision']} on a CPU runs slower than fp32; using 32-true.", file=sys.stderr
        )
        config["precision"] = "32-true"
