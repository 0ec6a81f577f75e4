"""Two-process DDP (gloo, CPU) through the real CLI with plain `ddp`: every parameter the model builds takes
part in the loss, so neither stage needs find_unused_parameters (only the 1A encoder freeze does)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowmo.data import build_sample_set

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FLOWMO = str(Path(sys.executable).parent / "flowmo")


def fit(stage: str, shards: Path, runs: Path, *extra: str) -> Path:
    args = [
        FLOWMO,
        "fit",
        "-c",
        str(CONFIGS / "base.yaml"),
        "-c",
        str(CONFIGS / "model/tiny.yaml"),
        "-c",
        str(CONFIGS / f"stage/{stage}.yaml"),
        "-c",
        str(CONFIGS / "data/sample.yaml"),
        "--run_name",
        f"ddp-{stage}",
        "--runs_dir",
        str(runs),
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.precision",
        "32-true",
        "--trainer.max_steps",
        "2",
        "--trainer.accumulate_grad_batches",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.val_check_interval",
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
        "--model.eval.sampler.steps",
        "2",
        "--model.feature_weights",
        "random",
        *extra,
    ]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return runs / f"ddp-{stage}" / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_both_stages_run_under_plain_ddp(tmp_path):
    shards = tmp_path / "sample"
    build_sample_set(shards, size=40, train_crops_per_photo=2, val_crops_per_photo=2, shard_size=4)
    stage_1a = fit("1a", shards, tmp_path / "runs", "--model.loss.perceptual", "lpips_vgg")
    stage_1b = fit("1b", shards, tmp_path / "runs", "--model.init.weights", str(stage_1a))
    assert torch.load(stage_1b, weights_only=False)["global_step"] == 2


@pytest.mark.slow
def test_the_encoder_freeze_under_plain_ddp_stops_and_resumes_with_the_decoder_alone(tmp_path):
    """Plain DDP all the way (no find_unused_parameters): the run stops at the freeze with last.ckpt, the resumed
    run freezes the encoder before DDP wraps the model, and Adam restarts with the decoder group alone."""
    shards = tmp_path / "sample"
    build_sample_set(shards, size=40, train_crops_per_photo=2, val_crops_per_photo=2, shard_size=4)
    runs = tmp_path / "runs"
    leg = ("--model.loss.perceptual", "none", "--model.optim.freeze_encoder_after", "2", "--trainer.max_steps", "4")
    at_freeze = fit("1a", shards, runs, *leg)
    frozen = torch.load(at_freeze, weights_only=False)
    assert frozen["global_step"] == 2
    end = fit("1a", shards, runs, *leg, "--ckpt_path", str(at_freeze))
    final = torch.load(end, weights_only=False)
    assert final["global_step"] == 4
    encoder = [k for k in final["state_dict"] if k.startswith("tokenizer.encoder.")]
    decoder = [k for k in final["state_dict"] if k.startswith("tokenizer.decoder.")]
    assert all(torch.equal(frozen["state_dict"][k], final["state_dict"][k]) for k in encoder)
    assert not all(torch.equal(frozen["state_dict"][k], final["state_dict"][k]) for k in decoder)
    groups = final["optimizer_states"][0]["param_groups"]
    assert [group["name"] for group in groups] == ["decoder"]
    assert all(int(s["step"]) == 2 for s in final["optimizer_states"][0]["state"].values())  # restarted at the freeze
