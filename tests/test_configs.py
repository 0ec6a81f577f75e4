"""Every YAML in configs/ parses through the real CLI parser, alone and in the stacks the README uses.

Parsing stops right before classes are instantiated, so the 945M presets cost nothing here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flowmo.commands.lightning import FlowMoCLI

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# every tokenizer config file (grid files in configs/ablations/ are not configs: tests/test_ablate.py parses their
# cells; configs/generator/ belongs to `flowmo gen`: tests/test_generate_cli.py parses those)
ALL_YAML = sorted(
    p.relative_to(CONFIGS).as_posix()
    for p in CONFIGS.rglob("*.yaml")
    if p.parent.name not in ("ablations", "generator")
)


class ParsedOnly(Exception):
    pass


class ParseOnlyCLI(FlowMoCLI):
    def before_instantiate_classes(self) -> None:
        raise ParsedOnly(self.config)


def parse(*files: str, extra: tuple[str, ...] = ()) -> dict:
    args = ["fit"]
    for name in files:
        args += ["-c", str(CONFIGS / name)]
    with pytest.raises(ParsedOnly) as parsed:
        ParseOnlyCLI(args=args + list(extra))
    return parsed.value.args[0]["fit"]


def test_there_are_configs():
    assert {"base.yaml", "model/lo.yaml", "stage/1a.yaml", "stage/1b.yaml", "data/imagenet.yaml"} <= set(ALL_YAML)


@pytest.mark.parametrize("name", ALL_YAML)
def test_each_config_parses_on_top_of_base(name):
    config = parse("base.yaml", name)
    assert config["model"]["preset"] in ("tiny", "small", "lo", "hi", "demo")


def test_demo_stack_is_one_cpu_run_with_the_demo_recipe():
    config = parse("base.yaml", "model/demo.yaml", "stage/1a.yaml", "data/sample.yaml", "demo.yaml")
    model, trainer = config["model"], config["trainer"]
    assert model["preset"] == "demo" and model["loss"]["time_schedule"] == "noise_weighted"
    assert model["optim"]["ema_every"] == 1
    assert trainer["accumulate_grad_batches"] == 1 and trainer["precision"] == "32-true"
    assert config["data"]["image_size"] == 32 and not model["eval"]["rfid"]


@pytest.mark.parametrize("preset", ["lo", "hi"])
def test_paper_stage_1a_stack(preset):
    config = parse("base.yaml", f"model/{preset}.yaml", "stage/1a.yaml", "data/imagenet.yaml")
    model, trainer = config["model"], config["trainer"]
    assert model["preset"] == preset and model["stage"] == "1a"
    loss, optim = model["loss"], model["optim"]
    assert optim["lr"] == 1e-4 and list(optim["betas"]) == [0.9, 0.95]
    assert loss["perceptual"] == "lpips_vgg" and loss["perceptual_weight"] == 0.1
    assert (loss["entropy_weight"], loss["commitment_weight"]) == (0.0025, 0.000625)
    assert optim["freeze_encoder_after"] == 200_000 and loss["time_schedule"] == "fat_lognormal"
    assert config["data"]["batch_size"] * trainer["accumulate_grad_batches"] * 8 == 128
    assert trainer["precision"] == "bf16-mixed"
    assert config["checkpoint"]["every_n_train_steps"] == 5000


def test_paper_stage_1b_stack():
    config = parse(
        "base.yaml",
        "model/lo.yaml",
        "stage/1b.yaml",
        "data/imagenet.yaml",
        extra=("--model.init.weights", "runs/lo-1a/checkpoints/last.ckpt"),
    )
    model, trainer = config["model"], config["trainer"]
    loss = model["loss"]
    assert model["stage"] == "1b" and model["optim"]["lr"] == 5e-5
    assert loss["sample_loss"] == "resnet50_logits" and loss["sample_weight"] == 0.01
    assert loss["chain_steps"] == 8 and loss["checkpoint_chain"]
    assert config["data"]["batch_size"] * trainer["accumulate_grad_batches"] * 8 == 64
    assert trainer["max_steps"] == 25_000


def test_run_name_sets_the_checkpoint_folder():
    config = parse("base.yaml", extra=("--run_name", "lo-1a", "--runs_dir", "/scratch/runs"))
    assert config["checkpoint"]["dirpath"] == "/scratch/runs/lo-1a/checkpoints"
    assert config["trainer"]["default_root_dir"] == "/scratch/runs/lo-1a"


def callback_names(*files: str) -> list[str]:
    config = parse(*files, extra=("--model.init.weights", "runs/lo-1a/checkpoints/last.ckpt"))
    return [callback.class_path.rsplit(".", 1)[-1] for callback in config["trainer"]["callbacks"]]


def test_callbacks_are_declared_once_and_extended():
    """base.yaml declares the callbacks every run has; later configs append with `callbacks+:` (none restates it)."""
    restating = [name for name in ALL_YAML if "\n  callbacks:" in (CONFIGS / name).read_text() and name != "base.yaml"]
    restating += [p.name for p in (CONFIGS / "ablations").rglob("*.yaml") if "\n  callbacks:" in p.read_text()]
    assert not restating, restating
    base = ["LearningRateMonitor", "Throughput", "ReconstructionGrid", "SkippedSamples", "CheckpointRetention"]
    assert callback_names("base.yaml", "model/lo.yaml", "stage/1a.yaml", "data/imagenet.yaml") == base
    stage_1b = ("base.yaml", "model/lo.yaml", "stage/1b.yaml", "data/imagenet.yaml")
    assert callback_names(*stage_1b) == [*base, "BestRfidCheckpoint"]
    early_stop = (*stage_1b[:3], "stage/1b-early-stop.yaml", stage_1b[3])
    assert callback_names(*early_stop) == [*base, "BestRfidCheckpoint", "EarlyStopping"]
    evaluation = ("base.yaml", "model/lo.yaml", "data/imagenet.yaml", "eval/paper.yaml")
    assert callback_names(*evaluation) == [*base, "EvaluationReport"]
