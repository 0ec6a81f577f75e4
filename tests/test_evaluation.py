"""The evaluation protocol end to end on the tiny preset (CPU, random stand-in feature nets, generated shards):
`flowmo test` from a checkpoint and from an official-format file writes metrics.json / table_row.md / a grid;
--data.test_subsample picks every N-th image; Stage 1B selects (and may stop) on val/rfid during training."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from data_helpers import jpeg_bytes
from flowmo import from_official
from flowmo.callbacks.report import tokens_times_vocab
from flowmo.commands import main
from flowmo.config import FlowMoConfig
from flowmo.data import FlowMoDataModule
from flowmo.data.shards import write_shards
from flowmo.data.stream import ShardStream
from flowmo.flow import SamplerSettings
from flowmo.nn.quantizers import build_quantizer
from flowmo.presets import get as preset
from module_fields import module_with

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NUM_IMAGES = 10
CPU = [
    "--trainer.accelerator",
    "cpu",
    "--trainer.devices",
    "1",
    "--trainer.precision",
    "32-true",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
]


def configs(*names: str) -> list[str]:
    return [arg for name in names for arg in ("-c", str(CONFIGS / name))]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """10 generated JPEGs (two classes) as 3 val shards of 4, 4, 2 samples with a manifest."""
    root = tmp_path_factory.mktemp("eval-data")
    for index in range(NUM_IMAGES):
        folder = root / "images" / f"class{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{index:02d}.jpg").write_bytes(jpeg_bytes(index, size=(40, 36)))
    write_shards(root / "images", root / "shards", "val", shard_size=4, workers=1, shuffle=False, progress=False)
    return root / "shards" / "val.json"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A one-step tiny checkpoint whose hparams differ from the protocol: the protocol must win at test time,
    while the architecture (here entropy_group_bits 6) must come from the checkpoint."""
    torch.manual_seed(0)
    model = module_with(
        preset="tiny",
        architecture={"entropy_group_bits": 6},
        perceptual="none",
        feature_weights="random",
        sampler=SamplerSettings(steps=3, cfg=1.0),
        rfid=False,
        lr=1e-3,
    )
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, DataLoader([{"image": image} for image in images], batch_size=4))
    path = tmp_path_factory.mktemp("eval-ckpt") / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def official_file(tmp_path_factory, official_fixture) -> Path:
    """A released-style file: EMA weights = the fixture's, raw weights shifted (so a wrong pick shows)."""
    ema = official_fixture["official_state_dict"]
    path = tmp_path_factory.mktemp("eval-official") / "flowmo_tiny.pth"
    torch.save({"model_ema_state_dict": ema, "model_state_dict": {k: v + 1 for k, v in ema.items()}}, path)
    return path


def run_eval(tmp_path: Path, monkeypatch, shards: Path, *source: str) -> dict:
    monkeypatch.chdir(tmp_path)  # EvaluationReport writes results/<run_name>/ under the working directory
    args = [
        "test",
        *configs("base.yaml", "model/tiny.yaml", "data/sample.yaml", "eval/paper.yaml"),
        "--data.val_shards",
        str(shards),
        "--data.image_size",
        "32",
        "--model.feature_weights",
        "random",
        "--model.eval.sampler.steps",
        "2",
        "--runs_dir",
        str(tmp_path / "runs"),
        "--run_name",
        "tiny-eval",
        *CPU,
        *source,
    ]
    assert main(args) == 0
    return json.loads((tmp_path / "results" / "tiny-eval" / "metrics.json").read_text(encoding="utf-8"))


def check_protocol(report: dict, results: Path) -> None:
    expected = {
        "psnr",
        "psnr_paper",
        "ssim",
        "ssim_paper",
        "lpips_alex",
        "lpips_vgg",
        "rfid",
        "pairwise_features",
        "codebook_used_fraction",
        "codebook_perplexity",
    }
    assert expected <= set(report["metrics"]) and all(isinstance(v, float) for v in report["metrics"].values())
    assert report["sampler"] == {
        "steps": 2,
        "rho": 4.0,
        "cfg": 1.5,
        "cfg_interval": [0.17, 1.02],
        "seed": 0,
        "nfe": SamplerSettings(steps=2, rho=4.0, cfg=1.5, cfg_interval=(0.17, 1.02)).nfe,
    }
    assert report["num_images"] == NUM_IMAGES and report["weights"] == "ema" and report["skipped_samples"] == 0
    assert report["data"]["test_batch_size"] == 5 and report["resolution"] == [32, 32]
    assert {"LPIPS-alex", "LPIPS-vgg"} <= set(report["stand_ins"]) and "STAND-IN" in report["warning"]
    assert report["versions"]["torch"] == torch.__version__
    row = (results / "table_row.md").read_text(encoding="utf-8")
    assert row.startswith("| tokenizer | BPP | tokens × vocab | rFID↓ | PSNR↑ | SSIM↑ | LPIPS↓ |")
    assert "tiny-eval (STAND-IN NETS)" in row and f"{report['metrics']['psnr_paper']:.2f}" in row
    assert f"PSNR {report['metrics']['psnr']:.2f}" in row  # the correct value beside the paper-compatible one
    assert (results / "reconstructions.png").stat().st_size > 0


def test_eval_cli_from_a_checkpoint_writes_the_report(tmp_path, monkeypatch, shards, checkpoint):
    report = run_eval(tmp_path, monkeypatch, shards, "--ckpt_path", str(checkpoint))
    check_protocol(report, tmp_path / "results" / "tiny-eval")
    assert report["checkpoint"] == str(checkpoint) and report["init_weights"] is None
    assert report["model"]["architecture"]["entropy_group_bits"] == 6  # the checkpoint's, not the preset's
    assert report["model"]["hparams"]["eval"]["rfid"] is True  # the protocol's, not the checkpoint's
    assert report["metrics"]["codebook_used_fraction"] > 0
    assert report["weights_record"]["step"] == 1 and report["weights_record"]["weights"] == "ema"


def test_an_eval_at_another_size_reports_its_rate_and_reference_rows(tmp_path, monkeypatch, shards, checkpoint):
    """A 32 px tokenizer evaluated on 64 px images: the same code over 4x the pixels, and references at 64 px."""
    report = run_eval(tmp_path, monkeypatch, shards, "--ckpt_path", str(checkpoint), "--data.image_size", "64")
    config = FlowMoConfig.from_dict(report["model"]["architecture"])
    assert report["resolution"] == [64, 64] and report["bits_per_pixel"] == config.bits_per_pixel_at(64, 64)
    assert report["bits_per_pixel_at_training_size"] == config.bits_per_pixel == 4 * report["bits_per_pixel"]
    assert {"mean_colour", "pool8"} <= set(report["references"])  # no longer dropped at another size
    assert f"| {report['bits_per_pixel']:.3f} |" in (tmp_path / "results" / "tiny-eval" / "table_row.md").read_text()


def test_eval_cli_from_an_official_file_uses_its_ema_weights(
    tmp_path, monkeypatch, shards, official_file, official_fixture
):
    model = module_with(preset="tiny", perceptual="none", feature_weights="random", weights=str(official_file))
    config = FlowMoConfig.from_dict(official_fixture["config"])
    expected = from_official(official_fixture["official_state_dict"], config).state_dict()
    for tokenizer in (model.tokenizer, model.eval_tokenizer()):
        assert all(torch.equal(value, expected[name]) for name, value in tokenizer.state_dict().items())
    report = run_eval(tmp_path, monkeypatch, shards, "--model.init.weights", str(official_file))
    check_protocol(report, tmp_path / "results" / "tiny-eval")
    assert report["init_weights"] == str(official_file) and report["checkpoint"] is None


def test_missing_feature_weights_stop_the_eval_with_one_sentence(tmp_path, monkeypatch, shards, checkpoint, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    args = [
        "test",
        *configs("base.yaml", "data/sample.yaml", "eval/paper.yaml"),
        "--data.val_shards",
        str(shards),
        "--runs_dir",
        str(tmp_path / "runs"),
        *CPU,
        "--ckpt_path",
        str(checkpoint),
    ]
    assert main(args) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("error: ") and "alexnet-owt-7be5be79.pth is not in" in message
    assert "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth" in message  # where it comes from
    assert "--model.feature_weights" in message and "fetch-weights" in message


def stream_keys(spec: Path, subsample: int, **kwargs) -> list[str]:
    data = FlowMoDataModule(
        val_shards=str(spec), image_size=32, val_batch_size=3, num_workers=0, test_subsample=subsample, **kwargs
    )
    data.setup("test")
    return [key for batch in data.test_dataloader() for key in batch["key"]]


def test_subsample_takes_every_nth_image_of_the_split(shards):
    every = stream_keys(shards, 1)
    assert len(every) == NUM_IMAGES
    assert stream_keys(shards, 3) == every[::3]  # indices 0, 3, 6, 9 across shards of 4, 4, 2
    data = FlowMoDataModule(val_shards=str(shards), test_subsample=3)
    urls, offsets = data._shard_urls("test"), data._shard_offsets("test")
    by_rank = [
        ShardStream(urls, 32, train=False, rank=r, world_size=2, subsample=3, shard_offsets=offsets) for r in range(2)
    ]
    assert sorted(s["key"] for stream in by_rank for s in stream) == sorted(every[::3])  # same set under DDP
    glob_keys = stream_keys(shards.parent / "val-*.tar", 3)  # no manifest: every 3rd sample of each shard
    assert glob_keys == [every[i] for i in (0, 3, 4, 7, 8)]
    with pytest.raises(ValueError, match="test_subsample must be >= 1"):
        FlowMoDataModule(val_shards=str(shards), test_subsample=0)


def test_table_columns_follow_the_paper():
    def vocabulary(name):
        return tokens_times_vocab(build_quantizer(preset(name)), preset(name).code_length)

    assert vocabulary("lo") == "256 × 2^18" and vocabulary("hi") == "1024 × 2^14"
    assert SamplerSettings(steps=25, rho=4.0, cfg=1.5, cfg_interval=(0.17, 1.02)).nfe == 31  # method §4


def test_stage_1b_selects_and_stops_on_val_rfid(tmp_path, shards, checkpoint):
    """The quick periodic validation runs inside fit, logs val/* and data/skipped_samples to TensorBoard, and the
    1B ModelCheckpoint keeps best-rfid.ckpt; the early-stop overlay runs beside it."""
    args = [
        "fit",
        *configs("base.yaml", "model/tiny.yaml", "stage/1b.yaml", "stage/1b-early-stop.yaml", "data/sample.yaml"),
        "--data.train_shards",
        str(shards),
        "--data.val_shards",
        str(shards),
        "--data.image_size",
        "32",
        "--data.batch_size",
        "2",
        "--data.val_batch_size",
        "5",
        "--model.init.weights",
        str(checkpoint),
        "--model.architecture",
        '{"entropy_group_bits": 6}',
        "--model.feature_weights",
        "random",
        "--model.loss.sample_loss",
        "none",  # the ResNet chain is test_training's; here it would only cost time
        "--model.eval.sampler.steps",
        "2",
        "--trainer.max_steps",
        "2",
        "--trainer.accumulate_grad_batches",
        "1",
        "--trainer.val_check_interval",
        "1",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.log_every_n_steps",
        "1",
        "--runs_dir",
        str(tmp_path / "runs"),
        "--run_name",
        "tiny-1b",
        *CPU,
    ]
    assert main(args) == 0
    best = list((tmp_path / "runs" / "tiny-1b").rglob("best-rfid.ckpt"))
    assert len(best) == 1
    states = torch.load(best[0], weights_only=False)["callbacks"]
    monitor = next(v for k, v in states.items() if k.startswith("BestRfidCheckpoint{'monitor': 'val/rfid'"))
    assert torch.isfinite(torch.as_tensor(monitor["best_model_score"]))
    assert any(k.startswith("EarlyStopping{'monitor': 'val/rfid'") for k in states)
    events = b"".join(p.read_bytes() for p in (tmp_path / "runs" / "tiny-1b").rglob("events.out.tfevents.*"))
    for tag in (b"val/rfid", b"val/psnr_paper", b"val/reconstructions_0", b"data/skipped_samples"):
        assert tag in events, tag


@pytest.mark.slow
def test_distributed_eval_counts_every_image_once(tmp_path, shards, checkpoint):
    """Two CPU processes (gloo): each image evaluated once, the count summed, one report written by rank 0."""
    import subprocess
    import sys

    args = [
        "test",
        *configs("base.yaml", "data/sample.yaml", "eval/paper.yaml"),
        "--data.val_shards",
        str(shards),
        "--data.image_size",
        "32",
        "--model.feature_weights",
        "random",
        "--model.eval.sampler.steps",
        "2",
        "--runs_dir",
        str(tmp_path / "runs"),
        "--run_name",
        "ddp",
        *CPU,
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--data.test_subsample",
        "3",
        "--ckpt_path",
        str(checkpoint),
    ]
    done = subprocess.run(
        [sys.executable, "-m", "flowmo", *args], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "results" / "ddp" / "metrics.json").read_text())
    assert report["world_size"] == 2 and report["num_images"] == 4  # indices 0, 3, 6, 9
    # the reference codecs are reduced over both ranks too (a collective every rank joins)
    assert set(report["references"]) == {"mean_colour", "pool8", "equal_bit"}
    assert 0 < report["references"]["mean_colour"]["psnr"] < report["references"]["pool8"]["psnr"] < 60


@pytest.mark.skipif(__import__("shutil").which("make") is None, reason="needs GNU make")
def test_make_eval_targets_pass_ckpt_or_official_and_subsample():
    """`make -n` only prints the commands: no GPU, no data, no venv needed to parse the targets. `-o STAMP`: never
    (re)install the venv from a test."""
    import subprocess

    root = CONFIGS.parent

    def dry_run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["make", "-n", "-o", ".venv/.installed", *args], cwd=root, capture_output=True, text=True)

    ours = dry_run("eval-lo", "CKPT=runs/lo-1b/checkpoints/last.ckpt", "GPUS=1").stdout
    assert "test -c configs/base.yaml -c configs/model/lo.yaml" in ours and "-c configs/eval/paper.yaml" in ours
    assert "--ckpt_path runs/lo-1b/checkpoints/last.ckpt" in ours and "--run_name eval-lo " in ours
    official = dry_run("eval-hi", "OFFICIAL=flowmo_hi.pth", "SUBSAMPLE=10", "GPUS=8").stdout
    assert "--model.init.weights flowmo_hi.pth" in official and "--data.test_subsample 10" in official
    assert "--run_name eval-hi-sub10" in official and "--trainer.strategy ddp" in official
    missing = subprocess.run(["make", "-o", ".venv/.installed", "eval-lo"], cwd=root, capture_output=True, text=True)
    assert missing.returncode != 0 and "usage: make eval-lo CKPT=" in missing.stdout


def test_a_table_row_names_the_architecture_it_evaluated():
    from flowmo.callbacks.report import table_markdown

    report = {
        "metrics": {"psnr_paper": 20.0},
        "sampler": {"steps": 25, "rho": 4.0, "cfg": 1.5, "cfg_interval": [0.17, 1.02], "seed": 0, "nfe": 31},
        "stand_ins": [],
        "warning": None,
        "bits_per_pixel": 0.07,
        "tokens_x_vocab": "256 × 2^18",
        "num_images": 10,
        "weights": "ema",
        "precision": "32-true",
        "model": {"hparams": {"preset": "tiny"}},
    }
    assert "| eval-lo [tiny architecture] |" in table_markdown("eval-lo", report)  # make eval-lo CKPT=<tiny>
    assert "| eval-tiny |" in table_markdown("eval-tiny", report)
