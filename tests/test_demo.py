"""`flowmo demo` end to end with a handful of steps: the files and keys the issue promises users."""

import json

from flowmo.data import build_sample_set
from flowmo.demo import main


def test_demo_writes_grid_and_metrics(tmp_path):
    data = tmp_path / "sample"
    build_sample_set(data, size=40, train_crops_per_photo=2, val_crops_per_photo=1, shard_size=8)
    out = tmp_path / "demo"
    assert main(["--out", str(out), "--data", str(data), "--runs-dir", str(tmp_path / "runs"), "--steps-1a", "2",
                 "--steps-1b", "1", "--freeze-encoder-after", "1", "--batch-1b", "2", "--feature-weights", "random",
                 "--rows", "3"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("psnr_1a", "psnr_1b", "ssim_1a", "ssim_1b", "psnr_mean_colour_baseline", "wall_s"):
        assert isinstance(metrics[key], float), key
    assert metrics["stand_ins"] and metrics["val_images"] == 3
    assert metrics["sampler"]["steps"] == 25 and metrics["sampler"]["cfg"] == 1.5
    assert (out / "grid.png").stat().st_size > 0
