"""The `flowmo` command line end to end on tiny shards: fit, resume with --ckpt_path last, export."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from flowmo import FlowMoTokenizer, from_checkpoint
from flowmo.commands import COMMANDS, LIGHTNING, main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
warnings.filterwarnings("ignore")


def fit_args(shards: Path, runs: Path, steps: int, *extra: str) -> list[str]:
    return [
        "fit",
        "-c",
        str(CONFIGS / "base.yaml"),
        "-c",
        str(CONFIGS / "model/tiny.yaml"),
        "-c",
        str(CONFIGS / "stage/1a.yaml"),
        "-c",
        str(CONFIGS / "data/sample.yaml"),
        "--run_name",
        "cli-tiny",
        "--runs_dir",
        str(runs),
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "1",
        "--trainer.precision",
        "32-true",
        "--trainer.max_steps",
        str(steps),
        "--trainer.accumulate_grad_batches",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.val_check_interval",
        "2",
        "--trainer.log_every_n_steps",
        "1",
        "--checkpoint.every_n_train_steps",
        "2",
        "--data.train_shards",
        str(shards / "train.json"),
        "--data.val_shards",
        str(shards / "val.json"),
        "--data.image_size",
        "32",
        "--data.batch_size",
        "2",
        "--data.val_batch_size",
        "2",
        "--model.loss.perceptual",
        "none",
        "--model.eval.sampler.steps",
        "2",
        "--model.optim.ema_every",
        "1",
        *extra,
    ]


def assert_tensorboard_has_the_promised_curves(run_dir: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(run_dir.glob("events.out.tfevents.*"))))
    events.Reload()
    scalars, images = set(events.Tags()["scalars"]), set(events.Tags()["images"])
    promised = {
        "train/flow",
        "train/entropy",
        "train/commitment",
        "train/total",
        "train/grad_norm",
        "train/param_norm",
        "train/ema_relative_distance",
        "train/codebook_used_fraction",
        "train/code_entropy_bits",
        "train/steps_per_s",
        "train/images_per_s",
        "val/psnr",
        "val/psnr_paper",
        "val/ssim",
        "data/skipped_samples",
    }
    assert promised <= scalars, promised - scalars
    assert any(tag.startswith("lr-Adam") for tag in scalars), scalars
    assert "val/reconstructions_0" in images


def test_fit_resume_last_and_export(sample_shards, tmp_path):
    runs = tmp_path / "runs"
    assert main(fit_args(sample_shards, runs, 2)) == 0
    checkpoints = runs / "cli-tiny" / "checkpoints"
    assert (checkpoints / "last.ckpt").is_file()
    assert (runs / "cli-tiny" / "version_0" / "config.yaml").is_file()  # the resolved config of the run
    assert_tensorboard_has_the_promised_curves(runs / "cli-tiny" / "version_0")

    assert main(fit_args(sample_shards, runs, 4, "--ckpt_path", "last")) == 0
    resumed = torch.load(checkpoints / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == 4
    assert resumed["flowmo_config"]["code_length"] == 16 and "flowmo_noise_generator" in resumed

    exported = tmp_path / "tiny.pt"
    assert main(["export", "--ckpt", str(checkpoints / "last.ckpt"), "--out", str(exported)]) == 0
    tokenizer = from_checkpoint(exported)
    assert tokenizer.weights_record["step"] == 4 and tokenizer.weights_record["ema_updates"] == 4  # kept by the export
    ema = {k[len("ema.module.") :]: v for k, v in resumed["state_dict"].items() if k.startswith("ema.module.")}
    assert all(torch.equal(v, ema[k]) for k, v in tokenizer.state_dict().items())
    raw = from_checkpoint(checkpoints / "last.ckpt", weights="raw")
    assert all(torch.equal(v, resumed["state_dict"][f"tokenizer.{k}"]) for k, v in raw.state_dict().items())


def test_missing_shards_give_one_clear_sentence(tmp_path, capsys):
    args = fit_args(tmp_path / "nowhere", tmp_path / "runs", 1)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "make sample-data" in err and "Traceback" not in err


def test_from_checkpoint_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint at"):
        from_checkpoint(tmp_path / "missing.ckpt")


def test_reconstruct_tokenize_detokenize_files(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from flowmo.checkpoint import export_tokenizer

    torch.manual_seed(0)
    tokenizer_file = export_tokenizer(FlowMoTokenizer.from_preset("tiny"), tmp_path / "tiny.pt")
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(3):
        Image.fromarray(np.random.default_rng(index).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
            photos / f"p{index}.png"
        )
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    common = ["--tokenizer", str(tokenizer_file), "--sampler", "fast", "--steps", "2"]
    assert main(["reconstruct", str(photos), "--out", str(tmp_path / "recon"), *common]) == 0
    assert (
        "wrote 3 input | reconstruction PNGs to" in (out := capsys.readouterr().out)
        and "skipped 1 unreadable: broken.jpg" in out
    )
    with Image.open(tmp_path / "recon" / "p0.png") as image:
        assert image.size == (64, 32)  # input | reconstruction, 32 px each
    assert main(["tokenize", str(photos), "--out", str(tmp_path / "ids"), *common]) == 0
    ids = np.load(tmp_path / "ids" / "p1.npy")
    assert ids.dtype == np.uint16 and ids.shape == (32,) and ids.max() < 512
    assert main(["detokenize", str(tmp_path / "ids"), "--out", str(tmp_path / "decoded"), "--size", "48", *common]) == 0
    with Image.open(tmp_path / "decoded" / "p2.png") as image:
        assert image.size == (48, 48)
    np.save(tmp_path / "ids" / "bad.npy", np.full(32, 9999))
    assert main(["detokenize", str(tmp_path / "ids"), "--out", str(tmp_path / "d2"), *common]) == 2
    assert "token ids must lie in [0, 512)" in capsys.readouterr().err
    (tmp_path / "ids" / "bad.npy").write_bytes(b"<html>not an array</html>")  # damage: named, not misreported
    assert main(["detokenize", str(tmp_path / "ids"), "--out", str(tmp_path / "d3"), *common]) == 2
    assert "bad.npy is not a readable .npy array of token ids" in capsys.readouterr().err


@pytest.mark.parametrize("command", sorted(set(COMMANDS) - {"gen", *LIGHTNING}))
def test_project_command_help_answers_without_importing_torch(command):
    """`flowmo COMMAND --help` of every project subcommand (gen is LightningCLI's) prints its options before torch
    loads: tens of milliseconds instead of seconds."""
    probe = (
        f"import sys\nfrom flowmo.commands import main\ntry:\n    main([{command!r}, '--help'])\nexcept SystemExit:\n"
        "    pass\nprint('TORCH_IMPORTED' if 'torch' in sys.modules else 'TORCH_NOT_IMPORTED')"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: flowmo" in result.stdout
    assert result.stdout.strip().endswith("TORCH_NOT_IMPORTED")


def test_the_commands_sampler_names_are_the_registry_s():
    """The parsers list the names without importing torch; flowmo.flow.SAMPLERS holds the settings."""
    from flowmo.commands.options import SAMPLER_NAMES
    from flowmo.flow import SAMPLERS

    assert SAMPLER_NAMES == tuple(SAMPLERS)


def test_validate_logs_at_the_checkpoints_step_in_the_runs_validate_folder(sample_shards, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = tmp_path / "runs"
    assert main(fit_args(sample_shards, runs, 2)) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "validate",
                *fit_args(sample_shards, runs, 2)[1:],
                "--ckpt_path",
                str(runs / "cli-tiny" / "checkpoints" / "last.ckpt"),
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "flowmo validate: EMA weights of step 2 (2 updates" in err and "LightningCLI's args" not in err
    events = EventAccumulator(str(runs / "cli-tiny" / "validate"))
    events.Reload()
    assert [e.step for e in events.Scalars("val/psnr")] == [2]  # on the training curve, not at step 0
    assert not {"hp_metric", "epoch"} & set(events.Tags()["scalars"])


def test_refused_options_and_commands_say_what_to_do_instead(capsys):
    assert main(["fit", "--trainer.default_root_dir", "x"]) == 2
    assert "--runs_dir DIR and --run_name NAME" in capsys.readouterr().err
    assert main(["predict", "-c", "x.yaml"]) == 2
    assert "flowmo reconstruct" in capsys.readouterr().err
