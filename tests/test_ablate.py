"""The Table-4 ablation grid (src/flowmo/ablate.py, configs/ablations/): overlays, commands, results table."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from flowmo import ablate
from flowmo.checkpoint import export_tokenizer
from flowmo.cli import FlowMoCLI
from flowmo.config import resolve_config
from flowmo.module import FlowMoModule
from flowmo.nn.tokenizer import FlowMoTokenizer
from flowmo.official import official_parameter_count

REPO = Path(__file__).resolve().parents[1]
# LightningCLI warns when given args while pytest has its own command line: expected here
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


class _Parsed(Exception):
    pass


class ParseOnlyCLI(FlowMoCLI):
    """Parses the full config stack like `flowmo fit|test`, then stops before building the 517M model."""

    def before_instantiate_classes(self) -> None:
        raise _Parsed(self.config)


def parse(step: ablate.Step):
    with pytest.raises(_Parsed) as info:
        ParseOnlyCLI(args=list(step.argv))
    config = info.value.args[0]
    return config[config.subcommand]


def steps_by_key(cells: str, **options) -> dict[tuple[str, str], ablate.Step]:
    return {(s.cell, s.action): s for s in ablate.plan(ablate.select(cells), ablate.Options(**options))}


@pytest.fixture(scope="module")
def parsed_grid():
    """Every step of the whole grid, parsed once from the repository root."""
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        return {key: parse(step) for key, step in steps_by_key("all").items()}
    finally:
        os.chdir(cwd)


def test_every_cell_has_an_overlay_and_the_base_is_forty_epochs():
    assert ablate.BASE_STEPS == 400_365  # ceil(1,281,167 x 40 / 128)
    for name in ablate.CELLS:
        assert (REPO / "configs" / "ablations" / f"{name}.yaml").is_file(), name
    assert sorted(p.stem for p in (REPO / "configs" / "ablations").glob("*.yaml")) == sorted(ablate.CELLS)


def test_base_cell_resolves_to_the_fewer_params_recipe(parsed_grid):
    fit = parsed_grid[("base", "fit")]
    config = resolve_config(fit.model.preset, fit.model.architecture)
    assert (config.patch_size, config.decoder.width, config.quantizer, config.code_dim) == (8, 768, "lfq", 18)
    assert fit.trainer.max_steps == 400_365 and fit.run_name == "ablate-base"
    assert (fit.model.time_schedule, fit.model.perceptual_weight, fit.model.freeze_encoder_after) == \
        ("fat_lognormal", 0.1, 200_000)
    assert fit.ckpt_path == "last"


@pytest.mark.parametrize("cell, check", [
    ("patch16", lambda m, c: c.patch_size == 16 and c.decoder.width == 768),
    ("no_perceptual", lambda m, c: m.perceptual_weight == 0.0 and c.patch_size == 8),
    ("fsq", lambda m, c: c.quantizer == "fsq" and c.bits_per_token == 18 and c.fsq_levels == (8,) * 6),
    ("logitnormal", lambda m, c: m.time_schedule == "lognormal"),
    ("mse_frozen_encoder", lambda m, c: m.init_weights == "runs/ablate-no_perceptual/checkpoints/last.ckpt"
     and m.init_weights_parts == "encoder" and m.freeze_encoder_after == 0 and m.perceptual_weight == 0.1),
])
def test_training_cells_change_one_thing(parsed_grid, cell, check):
    fit = parsed_grid[(cell, "fit")]
    assert check(fit.model, resolve_config(fit.model.preset, fit.model.architecture))
    assert fit.run_name == f"ablate-{cell}" and fit.trainer.max_steps == 400_365


@pytest.mark.parametrize("cell, rho, cfg", [("sampler_rho1", 1.0, 1.5), ("no_cfg", 4.0, 1.0), ("base", 4.0, 1.5)])
def test_evaluation_overlays_win_over_the_eval_protocol(parsed_grid, cell, rho, cfg):
    test = parsed_grid[(cell, "test")]
    assert (test.model.val_rho, test.model.val_cfg, test.model.val_steps) == (rho, cfg, 25)
    assert test.model.init_weights == "runs/ablate-base/checkpoints/last.ckpt"
    assert (test.model.init_weights_from, test.model.init_weights_parts) == ("ema", "all")
    assert test.run_name == f"ablate-{cell}" and test.model.val_rfid


def test_the_mse_cell_is_tested_with_all_of_its_own_weights(parsed_grid):
    test = parsed_grid[("mse_frozen_encoder", "test")]
    assert test.model.init_weights == "runs/ablate-mse_frozen_encoder/checkpoints/last.ckpt"
    assert test.model.init_weights_parts == "all"


@pytest.mark.parametrize("width", [2, 3, 5])
def test_scaling_cells_scale_the_decoder_only(parsed_grid, width):
    fit = parsed_grid[(f"scale_w{width}", "fit")]
    config = resolve_config(fit.model.preset, fit.model.architecture)
    assert config.decoder.width == 192 * width and config.decoder.depth == 16
    assert sum(config.decoder.rope_axes) == config.decoder.head_dim and config.encoder.width == 768
    assert config.patch_size == 8


def _parameters(width: int) -> float:
    decoder = {2: (384, 12, (4, 14, 14)), 3: (576, 9, (8, 28, 28)), 4: (768, 12, (8, 28, 28)),
               5: (960, 15, (8, 28, 28))}[width]
    config = resolve_config("small", {"decoder": dict(zip(("width", "heads", "rope_axes"), decoder))})
    return official_parameter_count(config) / 1e6


def test_scaling_widths_reproduce_the_papers_parameter_counts():
    """The paper's 260/367/517/710M are counted in the authors' layout (unused tensors included), as here."""
    ours = {w: _parameters(w) for w in (2, 3, 4, 5)}
    paper = {2: 260, 3: 367, 4: 517, 5: 710}
    for width, count in paper.items():
        assert abs(ours[width] - count) < 2.5, (width, ours)


def test_dry_run_lists_dependencies_first_and_reuses_the_base_checkpoint(capsys):
    assert ablate.main(["run", "--cells", "sampler_rho1,no_cfg,mse_frozen_encoder,scale_w4", "--dry-run",
                        "--gpus", "4", "--steps", "1000"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("flowmo ")]
    actions = [(shlex.split(line)[1], shlex.split(line)[shlex.split(line).index("--run_name") + 1]) for line in lines]
    assert actions == [("fit", "ablate-no_perceptual"), ("fit", "ablate-mse_frozen_encoder"),
                       ("test", "ablate-mse_frozen_encoder"), ("fit", "ablate-base"), ("test", "ablate-sampler_rho1"),
                       ("test", "ablate-no_cfg"), ("test", "ablate-base")]
    for line in lines:
        if " test " in line and "mse" not in line:
            assert "--model.init_weights runs/ablate-base/checkpoints/last.ckpt" in line
        if " fit " in line:
            assert "--trainer.max_steps 1000" in line and "--trainer.accumulate_grad_batches 4" in line
            assert "--trainer.strategy ddp_find_unused_parameters_true" in line  # the encoder freezes
    assert "--model.init_weights runs/ablate-no_perceptual/checkpoints/last.ckpt" in lines[1]


def test_cell_selection_and_its_errors():
    assert ablate.select("scaling") == ["scale_w2", "scale_w3", "scale_w4", "scale_w5"]
    assert ablate.select("fsq,base,fsq") == ["base", "fsq"]
    assert len(ablate.select("all")) == len(ablate.CELLS)
    with pytest.raises(ValueError, match="unknown ablation cell 'fast'"):
        ablate.select("base,fast")
    with pytest.raises(ValueError, match="global batch 128"):
        ablate.plan(["base"], ablate.Options(gpus=3))


def _write_metrics(results: Path, run: str, report: dict) -> None:
    (results / run).mkdir(parents=True)
    (results / run / "metrics.json").write_text(json.dumps(report))


def test_table_from_metrics_files(tmp_path, capsys):
    results = tmp_path / "results"
    _write_metrics(results, "ablate-base", {"metrics": {"rfid": 2.9, "psnr_paper": 20.6, "psnr": 20.9,
                                                        "lpips_alex": 0.151, "lpips_vgg": 0.2},
                                            "num_images": 50_000, "stand_ins": []})
    _write_metrics(results, "ablate-fsq", {"test/rfid": 3.5, "psnr": 21.0, "lpips_vgg": 0.19, "num_images": 5000,
                                           "stand_ins": ["LPIPS-vgg"]})
    assert ablate.main(["table", "--results-dir", str(results)]) == 0
    table = (results / "ablations" / "table.md").read_text()
    assert "| base | base | 2.90 | 2.87 | 20.60 | 20.71 | 0.151 | 0.150 |  |" in table
    fsq = next(line for line in table.splitlines() if line.startswith("| fsq "))
    assert "3.50 | 3.14 | 21.00 | 21.31 | 0.190 | 0.140" in fsq
    assert "STAND-IN" in fsq and "5000 images" in fsq and "per-image PSNR" in fsq and "lpips_vgg" in fsq
    assert "| scale_w4 | decoder width 768 (w=4) | 517M | 2.90 | 4.45 |" in table  # the base run's numbers
    assert "not run yet" in next(line for line in table.splitlines() if line.startswith("| no_cfg "))
    rows = (results / "ablations" / "table.csv").read_text().splitlines()
    assert rows[0].startswith("cell,group,variant,run,params,rfid,rfid_paper")
    assert len(rows) == 1 + len(ablate.CELLS)


def test_tests_with_current_metrics_are_skipped(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda argv, check: calls.append(argv) or subprocess.CompletedProcess(argv, 0))
    options = ablate.Options(runs_dir=str(tmp_path / "runs"), results_dir=str(tmp_path / "results"))
    steps = ablate.plan(["base"], options)
    ckpt = Path(steps[0].checkpoint)
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    _write_metrics(tmp_path / "results", "ablate-base", {"rfid": 1.0})
    ablate.execute(steps, options)
    assert [argv[3] for argv in calls] == ["fit"]
    ablate.execute(steps, options, force=True)
    assert [argv[3] for argv in calls] == ["fit", "fit", "test"]


# ---------------------------------------------------------------------------------- the module side
def _tiny(**kwargs) -> FlowMoModule:
    return FlowMoModule(**{"preset": "tiny", "perceptual": "none", "feature_weights": "random", **kwargs})


def _fit(model: FlowMoModule, steps: int = 2) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        log_every_n_steps=1)
    trainer.fit(model, torch.utils.data.DataLoader(torch.rand(8, 3, 32, 32) * 2 - 1, batch_size=4))
    return trainer


def test_encoder_only_init_keeps_a_fresh_decoder_and_freezes_the_encoder(tmp_path):
    torch.manual_seed(0)
    pretrained = FlowMoTokenizer.from_preset("tiny")
    path = export_tokenizer(pretrained, tmp_path / "pretrained.pt")
    torch.manual_seed(1)
    model = _tiny(init_weights=str(path), init_weights_parts="encoder", freeze_encoder_after=0)
    for ours, theirs in zip(model.tokenizer.encoder.parameters(), pretrained.encoder.parameters()):
        assert torch.equal(ours, theirs)
    assert not torch.equal(model.tokenizer.decoder.img_in.weight, pretrained.decoder.img_in.weight)
    before = [p.clone() for p in model.tokenizer.parameters()]
    _fit(model)
    moved = [not torch.equal(a, b) for a, b in zip(before, model.tokenizer.parameters())]
    encoder_count = len(list(model.tokenizer.encoder.parameters()))
    assert not any(moved[:encoder_count]) and any(moved[encoder_count:])  # encoder frozen from step 0
    with pytest.raises(ValueError, match="init_weights_parts"):
        _tiny(init_weights_parts="encoder")


def test_the_fsq_cell_trains():
    model = _tiny(architecture={"quantizer": "fsq", "code_dim": 6, "fsq_levels": [8] * 6})
    _fit(model)
    assert model.config.bits_per_token == 18


@pytest.mark.slow
def test_tiny_grid_end_to_end(tmp_path):
    """base + the no_cfg evaluation-only cell, 2 steps of the tiny preset on sample shards, random stand-ins."""
    from flowmo.data.sample_set import build_sample_set

    build_sample_set(tmp_path / "sample", size=48, train_crops_per_photo=4, val_crops_per_photo=2, shard_size=8)
    data = tmp_path / "data.yaml"
    data.write_text(f"data:\n  train_shards: {tmp_path}/sample/train.json\n  val_shards: {tmp_path}/sample/val.json\n"
                    "  image_size: 32\n  batch_size: 4\n  val_batch_size: 4\n  num_workers: 0\n  pin_memory: false\n"
                    "  persistent_workers: false\n  shuffle_buffer: 8\n")
    extra = ("--model.preset tiny --model.feature_weights random --trainer.accelerator cpu --trainer.devices 1 "
             "--trainer.precision 32-true --model.val_steps 4")
    command = [sys.executable, "-m", "flowmo", "ablate", "run", "--cells", "no_cfg,base", "--steps", "2",
               "--config-dir", str(REPO / "configs"), "--data-config", str(data),
               "--eval-config", str(REPO / "configs" / "eval" / "paper.yaml"), f"--extra={extra}"]
    subprocess.run(command, cwd=tmp_path, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    base = json.loads((tmp_path / "results" / "ablate-base" / "metrics.json").read_text())
    no_cfg = json.loads((tmp_path / "results" / "ablate-no_cfg" / "metrics.json").read_text())
    assert (base["sampler"]["cfg"], no_cfg["sampler"]["cfg"]) == (1.5, 1.0)
    assert no_cfg["init_weights"] == "runs/ablate-base/checkpoints/last.ckpt"
    table = (tmp_path / "results" / "ablations" / "table.md").read_text()
    assert "| no_cfg | no CFG |" in table and "STAND-IN" in table
