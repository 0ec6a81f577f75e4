"""Two DDP ranks (gloo, CPU), issue 21: a run SIGKILLed past its last checkpoint resumes with each rank's own noise
and ends bit-equal to the uninterrupted run; a NaN in one rank's batch makes both ranks skip that step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowmo.faults import latest_checkpoint
from run_faults import kill_past_a_checkpoint, training_state

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
STEPS = 10
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def fit_command(shards: Path, runs: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "flowmo",
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
        "ddp",
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
        str(STEPS),
        "--trainer.accumulate_grad_batches",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.limit_val_batches",
        "0",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir",
        str(runs / "csv"),
        "--trainer.logger.flush_logs_every_n_steps",
        "1",
        "--checkpoint.every_n_train_steps",
        "3",
        "--data.train_shards",
        str(shards / "train.json"),
        "--data.val_shards",
        str(shards / "val.json"),
        "--data.image_size",
        "32",
        "--data.batch_size",
        "2",
        "--data.num_workers",
        "0",
        "--model.loss.perceptual",
        "none",
        "--model.optim.ema_every",
        "1",
        "--model.feature_weights",
        "random",
        *extra,
    ]


@pytest.mark.slow
def test_a_two_rank_run_killed_and_resumed_keeps_each_rank_s_noise_and_ends_bit_equal(sample_shards, tmp_path):
    uninterrupted = subprocess.run(
        fit_command(sample_shards, tmp_path / "a"), capture_output=True, text=True, env=ENV, timeout=600
    )
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    runs = tmp_path / "b"
    process = subprocess.Popen(
        fit_command(sample_shards, runs),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
        start_new_session=True,
    )
    done, saved = kill_past_a_checkpoint(process, runs, runs / "ddp", whole_group=True)
    assert 0 < saved < done < STEPS
    checkpoint = torch.load(latest_checkpoint(runs / "ddp", report=lambda m: None), weights_only=False)
    rank0, rank1 = checkpoint["flowmo_noise_generators"]
    assert not torch.equal(rank0, rank1), "both ranks saved one noise stream"
    resumed = subprocess.run(
        fit_command(sample_shards, runs, "--ckpt_path", "last"), capture_output=True, text=True, env=ENV, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = training_state(tmp_path / "a" / "ddp" / "checkpoints" / "last.ckpt")
    b = training_state(runs / "ddp" / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys() and "noise/rank1" in a
    assert not torch.equal(b["noise/rank0"], b["noise/rank1"])
    differing = [name for name in a if not torch.equal(a[name], b[name])]
    assert not differing, f"{len(differing)} of {len(a)} tensors differ after the resume, e.g. {differing[:5]}"


@pytest.mark.slow
def test_a_nan_on_one_rank_skips_the_step_on_both(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests/scripts/ddp_nan_one_rank.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for seen in ranks:  # step 1 (rank 1's NaN) moved nothing on either rank; step 2 moved the weights
        assert seen["skipped"] == 1
        assert all(torch.equal(a, b) for a, b in zip(seen["initial"], seen["weights"][0]))
        assert not all(torch.equal(a, b) for a, b in zip(seen["initial"], seen["weights"][1]))
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["weights"][1], ranks[1]["weights"][1]))
