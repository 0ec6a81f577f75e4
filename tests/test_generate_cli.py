"""`flowmo gen fit` on token shards (sample grids decoded through the tokenizer), `flowmo generate` writes PNGs
and a grid, and the generator configs parse."""

from pathlib import Path

import pytest
from PIL import Image

from flowmo.commands import main
from flowmo.commands.lightning import GeneratorCLI
from test_generate_tokens import pretokenize, tokenizer_file

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "generator"


class ParsedOnly(Exception):
    pass


class ParseOnlyCLI(GeneratorCLI):
    def before_instantiate_classes(self) -> None:
        raise ParsedOnly(self.config)


@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_generator_configs_parse(preset):
    with pytest.raises(ParsedOnly) as parsed:
        ParseOnlyCLI(args=["fit", "-c", str(CONFIGS / "base.yaml"), "-c", str(CONFIGS / f"{preset}.yaml")])
    config = parsed.value.args[0]["fit"]
    assert config["model"]["preset"] == preset
    if preset == "paper":  # 256 images per step on 8 GPUs for 300 ImageNet epochs
        assert config["data"]["batch_size"] * config["trainer"]["devices"] == 256
        assert config["trainer"]["max_steps"] == round(300 * 1_281_167 / 256)


@pytest.fixture(scope="module")
def trained_generator(tmp_path_factory, sample_shards):
    folder = tmp_path_factory.mktemp("gen")
    tokenizer = tokenizer_file(folder, seed=0)
    pretokenize(tokenizer, sample_shards / "train.json", folder / "tokens")
    code = main(
        [
            "gen",
            "fit",
            "-c",
            str(CONFIGS / "base.yaml"),
            "-c",
            str(CONFIGS / "tiny.yaml"),
            "--data.train_tokens",
            str(folder / "tokens" / "train.json"),
            "--data.val_tokens",
            str(folder / "tokens" / "train.json"),
            "--data.batch_size",
            "8",
            "--data.val_max_samples",
            "8",
            "--runs_dir",
            str(folder / "runs"),
            "--run_name",
            "g",
            "--trainer.max_steps",
            "4",
            "--trainer.val_check_interval",
            "2",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.log_every_n_steps",
            "1",
            "--model.tokenizer",
            str(tokenizer),
            "--model.grid_per_class",
            "1",
            "--model.sample_steps",
            "2",
        ]
    )
    assert code == 0
    return folder, tokenizer, folder / "runs" / "g" / "checkpoints" / "last.ckpt"


def test_gen_fit_checkpoints_and_logs_a_decoded_sample_grid(trained_generator):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder, _, checkpoint = trained_generator
    assert checkpoint.is_file()
    (events,) = (folder / "runs" / "g").glob("version_*/events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    assert "val/samples" in accumulator.Tags()["images"] and "train/loss" in accumulator.Tags()["scalars"]


def test_generate_cli_writes_pngs_and_a_grid(trained_generator, capsys):
    folder, tokenizer, checkpoint = trained_generator
    out = folder / "samples"
    assert (
        main(
            [
                "generate",
                "--generator",
                str(checkpoint),
                "--tokenizer",
                str(tokenizer),
                "--classes",
                "0,2",
                "--per-class",
                "3",
                "--out",
                str(out),
                "--steps",
                "2",
                "--sampler",
                "fast",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in out.glob("class*.png")) == [f"class{c}_{i}.png" for c in (0, 2) for i in range(3)]
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (2 + 3 * (32 + 2), 2 + 2 * (32 + 2))  # 3 columns per class row, 2 rows, padding 2
    assert "tokenizer decode" in capsys.readouterr().out


def test_generate_refuses_another_tokenizer(trained_generator, capsys):
    folder, _, checkpoint = trained_generator
    other = tokenizer_file(folder, seed=1)
    assert (
        main(
            [
                "generate",
                "--generator",
                str(checkpoint),
                "--tokenizer",
                str(other),
                "--classes",
                "0",
                "--out",
                str(folder / "refused"),
            ]
        )
        == 2
    )
    assert "another tokenizer" in capsys.readouterr().err


def test_gen_eval_cli_writes_a_report_naming_reference_and_protocol(trained_generator, sample_shards):
    import json

    folder, tokenizer, checkpoint = trained_generator
    out = folder / "eval" / "report.json"
    assert (
        main(
            [
                "gen-eval",
                "--generator",
                str(checkpoint),
                "--tokenizer",
                str(tokenizer),
                "--reference",
                str(sample_shards / "train.json"),
                "--num-samples",
                "10",
                "--batch",
                "5",
                "--features",
                "random",
                "--steps",
                "2",
                "--sampler",
                "fast",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert report["num_samples"] == 10 and report["stand_in_features"] and "protocol" in report
    assert report["reference"]["manifest"].endswith("train.json") and (folder / "eval" / "reference_stats.pt").is_file()


def test_gen_fit_resumes_from_last(trained_generator):
    import shutil

    import torch

    folder, _, _ = trained_generator
    shutil.copytree(folder / "runs" / "g", folder / "runs" / "resumed")  # the other tests keep their checkpoint
    checkpoint = folder / "runs" / "resumed" / "checkpoints" / "last.ckpt"
    code = main(
        [
            "gen",
            "fit",
            "-c",
            str(CONFIGS / "base.yaml"),
            "-c",
            str(CONFIGS / "tiny.yaml"),
            "--data.train_tokens",
            str(folder / "tokens" / "train.json"),
            "--data.val_tokens",
            "null",
            "--data.batch_size",
            "8",
            "--runs_dir",
            str(folder / "runs"),
            "--run_name",
            "resumed",
            "--trainer.max_steps",
            "6",
            "--trainer.enable_progress_bar",
            "false",
            "--ckpt_path",
            "last",
        ]
    )
    assert code == 0
    resumed = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert resumed["global_step"] == 6 and "mask_generator_state" in resumed


@pytest.mark.slow
def test_gen_eval_samples_on_two_ranks(trained_generator, sample_shards, tmp_path):
    """Lightning predict on 2 CPU ranks (ddp_spawn): rank 0 measures all ranks' samples."""
    from flowmo.generate.evaluate import GenerationFeatures, reference_statistics
    from flowmo.generate.gen_eval import sample_and_measure
    from flowmo.generate.sample import load_generator
    from flowmo.tools import load_tokenizer

    folder, tokenizer_path, checkpoint = trained_generator
    features = GenerationFeatures.stand_in(num_features=8)
    reference = reference_statistics(sample_shards / "train.json", features, 32)
    report = sample_and_measure(
        load_generator(str(checkpoint), "cpu"),
        load_tokenizer(str(tokenizer_path), "cpu"),
        features,
        reference,
        20,
        4,
        dict(steps=2),
        "fast",
        0,
        tmp_path / "features",
        "cpu",
        2,
        "ddp_spawn",
    )
    assert report["num_samples"] == 20 and len(list((tmp_path / "features").glob("features-rank*.pt"))) == 2
