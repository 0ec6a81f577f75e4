"""A newcomer's first hour with their own photos (issue 30): a folder -> `flowmo shards --val-fraction` -> the README's
CPU recipe -> a checkpoint whose default weights (EMA) reconstruct the training photos no worse than its raw ones,
and a TensorBoard run with a validation curve and reconstruction grids."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowmo import FlowMoTokenizer, from_checkpoint
from flowmo.commands import main as flowmo_main
from flowmo.data.sample_set import write_photo_crops
from flowmo.data.transforms import decode_rgb, val_transform
from flowmo.metrics import PSNR

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "camera.png", "retina.jpg", "brick.png")
# The README's CPU recipe (tiny preset, no perceptual net, validation and grids every 50 steps) on folder shards.
RECIPE = [
    "-c",
    "configs/base.yaml",
    "-c",
    "configs/model/tiny.yaml",
    "-c",
    "configs/stage/1a.yaml",
    "-c",
    "configs/data/folder.yaml",
    "--model.loss.perceptual",
    "none",
    "--trainer.log_every_n_steps",
    "10",
    "--trainer.val_check_interval",
    "100",
]


def own_photos(folder: Path) -> Path:
    """42 crops of 7 photographs (a class folder each), as a user's folder of 128 px photos, and one corrupt file."""
    for photo in PHOTOS:
        write_photo_crops(photo, folder, count=6, size=128, seed=0, with_center=True)
    (folder / "astronaut" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


def psnr_of(tokenizer: FlowMoTokenizer, images: torch.Tensor) -> float:
    metric = PSNR()
    with torch.no_grad():
        metric.update(tokenizer.eval().reconstruct(images, generator=torch.Generator().manual_seed(0)), images)
    return float(metric.compute())


@pytest.mark.slow
def test_the_readme_cpu_recipe_on_own_photos_gives_ema_weights_no_worse_than_raw(tmp_path, capsys):
    photos, shards, runs = own_photos(tmp_path / "my-photos"), tmp_path / "shards", tmp_path / "runs"
    assert (
        flowmo_main(
            [
                "shards",
                "--source",
                str(photos),
                "--out",
                str(shards),
                "--val-fraction",
                "0.2",
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "corrupt.jpg: " in capsys.readouterr().err  # named on the console, with its reason
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    fit = subprocess.run(
        [
            sys.executable,
            "-m",
            "flowmo",
            "fit",
            *RECIPE,
            "--trainer.max_steps",
            "150",
            "--data.train_shards",
            str(shards / "train.json"),
            "--data.val_shards",
            str(shards / "val.json"),
            "--runs_dir",
            str(runs),
            "--run_name",
            "own",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "LightningCLI's args" not in fit.stderr
    last = runs / "own" / "checkpoints" / "last.ckpt"
    ema, raw = from_checkpoint(last), from_checkpoint(last, weights="raw")
    assert ema.weights_record["ema_updates"] == 15 and ema.weights_record["ema_initial_share"] < 1e-3
    files = sorted(p for p in photos.rglob("*.jpg") if p.name != "corrupt.jpg")
    images = torch.stack([val_transform(decode_rgb(p.read_bytes()), 64) for p in files])
    ema_psnr, raw_psnr = psnr_of(ema, images), psnr_of(raw, images)
    print(f"150 steps on {len(files)} own photos: EMA {ema_psnr:.2f} dB, raw {raw_psnr:.2f} dB")
    assert ema_psnr >= raw_psnr - 0.5

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((runs / "own").glob("version_*"))))
    events.Reload()
    assert [e.step for e in events.Scalars("val/psnr")] == [49, 99, 149]  # a curve: every 50 optimizer steps
    assert events.Tags()["images"] and len(events.Scalars("train/total")) >= 10
    assert "hp_metric" not in events.Tags()["scalars"] and "epoch" not in events.Tags()["scalars"]
