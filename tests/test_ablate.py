"""Ablation grids as data (src/flowmo/ablate.py, configs/ablations/*.yaml): cells, commands, SLURM, results."""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from flowmo import ablate
from flowmo.checkpoint import export_tokenizer
from flowmo.commands import main as flowmo_main
from flowmo.commands.lightning import FlowMoCLI
from flowmo.errors import UserError
from flowmo.module import FlowMoModule
from flowmo.nn.tokenizer import FlowMoTokenizer, official_parameter_count
from flowmo.presets import resolve_config
from module_fields import module_with

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
# LightningCLI warns when given args while pytest has its own command line: expected here
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


class _Parsed(Exception):
    pass


class ParseOnlyCLI(FlowMoCLI):
    """Parses the full config stack like `flowmo fit|test`, then stops before building any model."""

    def before_instantiate_classes(self) -> None:
        raise _Parsed(self.config)


def ablate_main(argv: list[str]) -> int:
    return flowmo_main(["ablate", *argv])


def parse(step: ablate.Step):
    with pytest.raises(_Parsed) as info:
        ParseOnlyCLI(args=list(step.argv))
    config = info.value.args[0]
    return config[config.subcommand]


def options(tmp_path: Path, **kwargs) -> ablate.Options:
    return ablate.Options(config_dir=str(CONFIGS), runs_dir="runs", results_dir=str(tmp_path / "results"), **kwargs)


def parsed_plan(name: str, tmp_path: Path, **kwargs) -> dict[str, object]:
    """Every step of a shipped grid, parsed by the real CLI parser (inline overlays written first)."""
    grid = ablate.load_grid(name, CONFIGS)
    opts = options(tmp_path, **kwargs)
    ablate.check_overlays(grid, CONFIGS)
    ablate.write_inline_overlays(grid, opts)
    return {step.key: parse(step) for step in ablate.plan(grid, opts)}


def architecture(parsed) -> object:
    return resolve_config(parsed.model.preset, parsed.model.architecture)


def write_grid(folder: Path, text: str, name: str = "g") -> Path:
    (folder / "ablations").mkdir(parents=True, exist_ok=True)
    path = folder / "ablations" / f"{name}.yaml"
    path.write_text(text)
    return path


GRID_2X2 = """
title: two by two
stack: [base.yaml]
cells: {mode}
axes:
  - name: quant
    values:
      - {{name: lfq}}
      - {{name: fsq, overlay: {{model: {{architecture: {{quantizer: fsq, code_dim: 6,
                                                  fsq_levels: [8, 8, 8, 8, 8, 8]}}}}}}}}
  - name: post
    kind: posttrain
    values:
      - {{name: 'off'}}
      - {{name: 'on', overlay: {{trainer: {{max_steps: 3}}}}}}
  - name: cfg
    kind: eval
    values:
      - {{name: cfg1.5}}
      - {{name: nocfg, overlay: {{model: {{eval: {{sampler: {{cfg: 1.0}}}}}}}}}}
posttrain:
  stack: [base.yaml]
{extra}
"""


# ---------------------------------------------------------------------------------- grid files -> cells
def test_the_shipped_grids():
    assert ablate.available_grids(CONFIGS) == ["paper-posttrain", "paper-table4", "scaling", "tiny"]
    cells = {name: [c.name for c in ablate.load_grid(name, CONFIGS).cells] for name in ablate.available_grids(CONFIGS)}
    assert cells["paper-table4"] == [
        "base",
        "patch16",
        "mse_frozen_encoder",
        "no_perceptual",
        "fsq",
        "logitnormal",
        "sampler_rho1",
        "no_cfg",
    ]
    assert cells["paper-posttrain"] == ["base", "1b", "hi", "hi+1b"]  # product: Lo/Hi x 1A only / + 1B
    assert cells["scaling"] == ["base", "w2", "w3", "w5"]
    assert cells["tiny"] == ["base", "fat_lognormal", "lognormal", "fsq", "posttrain", "rho1", "no_cfg"]
    assert ablate.load_grid("tiny", CONFIGS).seeds == (0, 1, 2)
    assert ablate.load_grid("paper-table4", CONFIGS).seeds == (0,)  # no `seeds:`: one replicate, seed 0


def test_one_at_a_time_and_product_cells(tmp_path):
    path = write_grid(tmp_path, GRID_2X2.format(mode="one-at-a-time", extra=""))
    grid = ablate.load_grid(str(path))
    assert [c.name for c in grid.cells] == ["base", "fsq", "on", "nocfg"]
    path = write_grid(tmp_path, GRID_2X2.format(mode="product", extra=""))
    assert [c.name for c in ablate.load_grid(str(path)).cells] == [
        "base",
        "nocfg",
        "on",
        "on+nocfg",
        "fsq",
        "fsq+nocfg",
        "fsq+on",
        "fsq+on+nocfg",
    ]
    path = write_grid(tmp_path, GRID_2X2.format(mode="product", extra="product_axes: [quant, post]"))
    grid = ablate.load_grid(str(path))
    assert [c.name for c in grid.cells] == ["base", "on", "fsq", "fsq+on"]
    fsq_on = grid.cells[-1]
    assert [v.name for v in fsq_on.choice] == ["fsq", "on", "cfg1.5"]


def test_eval_axes_reuse_the_checkpoint_and_posttrain_starts_from_the_1a_run(tmp_path):
    path = write_grid(tmp_path, GRID_2X2.format(mode="product", extra=""))
    grid = ablate.load_grid(str(path))
    steps = ablate.plan(grid, options(tmp_path))
    fits = [s.run_name for s in steps if s.action == "fit"]
    assert fits == ["ablate-g-base-s0", "ablate-g-base-on-s0", "ablate-g-fsq-s0", "ablate-g-fsq-on-s0"]  # 8 cells
    tests = {s.cell: s for s in steps if s.action == "test"}
    assert len(tests) == 8
    assert tests["nocfg"].checkpoint == tests["base"].checkpoint == "runs/ablate-g-base-s0/checkpoints/last.ckpt"
    assert tests["fsq+on+nocfg"].checkpoint == "runs/ablate-g-fsq-on-s0/checkpoints/last.ckpt"
    hand_off = next(s for s in steps if s.run_name == "ablate-g-fsq-on-s0")
    argv = list(hand_off.argv)
    assert argv[argv.index("--model.init.weights") + 1] == "runs/ablate-g-fsq-s0/checkpoints/last.ckpt"
    assert argv[argv.index("--model.init.weights_from") + 1] == "ema" and hand_off.needs == ("fit:ablate-g-fsq-s0",)


def test_replicates_are_cells_times_seeds_with_eval_reuse_and_1b_per_seed(tmp_path):
    path = write_grid(tmp_path, GRID_2X2.format(mode="product", extra="seeds: [0, 1, 7]"))
    grid = ablate.load_grid(str(path))
    steps = ablate.plan(grid, options(tmp_path))
    fits = [s for s in steps if s.action == "fit"]
    tests = [s for s in steps if s.action == "test"]
    assert len(fits) == 4 * 3 and len(tests) == 8 * 3  # 4 distinct trained cells, 8 cells, 3 seeds
    for step in fits:  # the seed reaches initialisation, the data draw and the training noise
        argv = list(step.argv)
        assert step.run_name.endswith(f"-s{step.seed}")
        for flag in ("--seed_everything", "--model.seed", "--data.seed"):
            assert argv[argv.index(flag) + 1] == str(step.seed)
    by_key = {s.key: s for s in steps}
    for seed in (0, 1, 7):
        base, nocfg = by_key[f"test:base:s{seed}"], by_key[f"test:nocfg:s{seed}"]
        assert nocfg.checkpoint == base.checkpoint == f"runs/ablate-g-base-s{seed}/checkpoints/last.ckpt"
        assert nocfg.needs == (f"fit:ablate-g-base-s{seed}",)  # evaluation only: the seed's fit, no new one
        hand_off = by_key[f"fit:ablate-g-fsq-on-s{seed}"]
        argv = list(hand_off.argv)
        assert argv[argv.index("--model.init.weights") + 1] == f"runs/ablate-g-fsq-s{seed}/checkpoints/last.ckpt"
        assert hand_off.needs == (f"fit:ablate-g-fsq-s{seed}",)  # Stage 1B from the same seed's Stage 1A
        assert by_key[f"test:fsq+on:s{seed}"].checkpoint == hand_off.checkpoint
    for step in tests:  # every replicate is evaluated with the eval stack's noise: differences pair by seed
        assert "--model.seed" not in step.argv and "--seed_everything" not in step.argv
    assert "replicates: 3 (seeds 0, 1, 7)" in ablate.grid.describe(grid)


@pytest.mark.parametrize("seeds", ["[0, 0, 1]", "[0, x]", "[true, 1]", "[]", "[0.5]"])
def test_seeds_that_are_not_distinct_integers_are_refused(tmp_path, seeds):
    path = write_grid(tmp_path, GRID_2X2.format(mode="product", extra=f"seeds: {seeds}"))
    with pytest.raises(UserError, match=r"`seeds` must be a list of distinct integers, e.g. seeds: \[0, 1, 2\]"):
        ablate.load_grid(str(path))


@pytest.mark.slow
def test_tiny_grid_resolves_to_the_demo_recipe(tmp_path):
    parsed = parsed_plan("tiny", tmp_path)
    base = parsed["fit:ablate-tiny-base-s0"]
    assert architecture(base).bits_per_token == 72 and base.model.loss.time_schedule == "noise_weighted"
    assert (base.trainer.max_steps, base.model.optim.lr, base.data.batch_size, base.model.loss.perceptual) == (
        3000,
        1e-3,
        16,
        "none",
    )
    assert base.data.train_shards == "data/demo/train.json"
    grid = ablate.load_grid("tiny", CONFIGS)
    fits = [s for s in ablate.plan(grid, options(tmp_path)) if s.action == "fit"]
    assert all(s.argv[-2:] == ("--ckpt_path", "last") for s in fits)  # a rerun resumes (parsed: no run yet -> None)
    assert parsed["fit:ablate-tiny-lognormal-s1"].model.loss.time_schedule == "lognormal"
    assert parsed["fit:ablate-tiny-fat_lognormal-s2"].model.loss.time_schedule == "fat_lognormal"
    assert (
        parsed["fit:ablate-tiny-fat_lognormal-s2"].seed_everything,
        parsed["fit:ablate-tiny-fat_lognormal-s2"].model.seed,
        parsed["fit:ablate-tiny-fat_lognormal-s2"].data.seed,
    ) == (2, 2, 2)
    fsq = architecture(parsed["fit:ablate-tiny-fsq-s0"])
    assert fsq.quantizer == "fsq" and fsq.bits_per_token == 72  # the same bits as LFQ
    post = parsed["fit:ablate-tiny-base-posttrain-s1"]
    assert (post.model.stage, post.model.loss.sample_loss, post.model.loss.sample_weight, post.trainer.max_steps) == (
        "1b",
        "pixel_mse",
        10.0,
        800,
    )
    assert post.model.init.weights == "runs/ablate-tiny-base-s1/checkpoints/last.ckpt" and post.model.seed == 1
    assert parsed["test:posttrain:s1"].model.init.weights == "runs/ablate-tiny-base-posttrain-s1/checkpoints/last.ckpt"
    for seed in (0, 1, 2):
        for cell, rho, cfg in (("base", 4.0, 1.5), ("rho1", 1.0, 1.5), ("no_cfg", 4.0, 1.0)):
            test = parsed[f"test:{cell}:s{seed}"]
            assert (test.model.eval.sampler.rho, test.model.eval.sampler.cfg, test.model.eval.sampler.steps) == (
                rho,
                cfg,
                25,
            )
            # eval-only: the seed's checkpoint, no new fit; the same evaluation noise for every replicate
            assert test.model.init.weights == f"runs/ablate-tiny-base-s{seed}/checkpoints/last.ckpt"
            assert test.trainer.precision == "32-true" and test.model.eval.use_ema and test.model.seed == 0


def test_paper_table4_cells_change_one_thing(tmp_path):
    parsed = parsed_plan("paper-table4", tmp_path, gpus=4)
    base = parsed["fit:ablate-paper-table4-base-s0"]
    config = architecture(base)
    assert (config.patch_size, config.decoder.width, config.quantizer, config.code_dim) == (8, 768, "lfq", 18)
    assert base.trainer.max_steps == 400_365 and base.trainer.accumulate_grad_batches == 4  # 8 x 4 x 4 = 128
    assert (
        base.model.loss.time_schedule,
        base.model.loss.perceptual_weight,
        base.model.optim.freeze_encoder_after,
    ) == ("fat_lognormal", 0.1, 200_000)
    assert architecture(parsed["fit:ablate-paper-table4-patch16-s0"]).patch_size == 16
    assert parsed["fit:ablate-paper-table4-no_perceptual-s0"].model.loss.perceptual_weight == 0.0
    fsq = architecture(parsed["fit:ablate-paper-table4-fsq-s0"])
    assert fsq.quantizer == "fsq" and fsq.bits_per_token == 18 and fsq.fsq_levels == (8,) * 6
    assert parsed["fit:ablate-paper-table4-logitnormal-s0"].model.loss.time_schedule == "lognormal"
    mse = parsed["fit:ablate-paper-table4-mse_frozen_encoder-s0"]
    assert mse.model.init.weights == "runs/ablate-paper-table4-no_perceptual-s0/checkpoints/last.ckpt"
    assert (mse.model.init.parts, mse.model.optim.freeze_encoder_after, mse.model.loss.perceptual_weight) == (
        "encoder",
        0,
        0.1,
    )
    for cell, rho, cfg in (("sampler_rho1", 1.0, 1.5), ("no_cfg", 4.0, 1.0), ("base", 4.0, 1.5)):
        test = parsed[f"test:{cell}:s0"]
        assert (test.model.eval.sampler.rho, test.model.eval.sampler.cfg, test.model.eval.rfid) == (rho, cfg, True)
        assert test.model.init.weights == "runs/ablate-paper-table4-base-s0/checkpoints/last.ckpt"
    grid = ablate.load_grid("paper-table4", CONFIGS)
    keys = [s.key for s in ablate.plan(grid, options(tmp_path))]
    assert keys.index("fit:ablate-paper-table4-no_perceptual-s0") < keys.index(
        "fit:ablate-paper-table4-mse_frozen_encoder-s0"
    )
    assert {c.name: c.paper["psnr"] for c in grid.cells}["logitnormal"] == 16.45


def test_paper_posttrain_keeps_each_stage_length(tmp_path):
    parsed = parsed_plan("paper-posttrain", tmp_path)
    assert parsed["fit:ablate-paper-posttrain-base-s0"].trainer.max_steps == 1_300_000
    assert parsed["fit:ablate-paper-posttrain-hi-s0"].trainer.max_steps == 800_000
    hi_1b = parsed["fit:ablate-paper-posttrain-hi-1b-s0"]
    assert (hi_1b.model.stage, hi_1b.model.preset, hi_1b.trainer.max_steps) == ("1b", "hi", 25_000)
    assert hi_1b.model.init.weights == "runs/ablate-paper-posttrain-hi-s0/checkpoints/last.ckpt"


@pytest.mark.parametrize("width", [2, 3, 5])
def test_scaling_cells_scale_the_decoder_only(tmp_path, width):
    fit = parsed_plan("scaling", tmp_path)[f"fit:ablate-scaling-w{width}-s0"]
    config = architecture(fit)
    assert config.decoder.width == 192 * width and config.decoder.depth == 16
    assert sum(config.decoder.rope_axes) == config.decoder.head_dim and config.encoder.width == 768
    assert config.patch_size == 8


def _parameters(width: int) -> float:
    decoder = {
        2: (384, 12, (4, 14, 14)),
        3: (576, 9, (8, 28, 28)),
        4: (768, 12, (8, 28, 28)),
        5: (960, 15, (8, 28, 28)),
    }[width]
    config = resolve_config("small", {"decoder": dict(zip(("width", "heads", "rope_axes"), decoder))})
    return official_parameter_count(config) / 1e6


def test_scaling_widths_reproduce_the_papers_parameter_counts():
    """The paper's 260/367/517/710M are counted in the authors' layout (unused tensors included), as here."""
    ours = {w: _parameters(w) for w in (2, 3, 4, 5)}
    paper = {2: 260, 3: 367, 4: 517, 5: 710}
    for width, count in paper.items():
        assert abs(ours[width] - count) < 2.5, (width, ours)


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "overlay, message",
    [
        ("ablations/overlays/nope.yaml", "names the overlay .*nope.yaml, which does not exist"),
        (
            "{model: {loss: {time_shedule: uniform}}}",
            "sets `model.loss.time_shedule`, which is not a flowmo fit/test argument "
            r"\(did you mean 'time_schedule'\?\)",
        ),
        ("{trainer: {max_step: 3}}", "sets `trainer.max_step`.*did you mean 'max_steps'"),
        ("{model: {architecture: {patch: 2}}}", "sets `model.architecture.patch`.*did you mean 'patch_size'"),
        ("{modle: {lr: 1.0}}", "sets `modle.lr`.*did you mean 'model'"),
    ],
)
def test_bad_overlays_are_refused_before_anything_runs(tmp_path, overlay, message):
    path = write_grid(
        tmp_path,
        f"stack: [base.yaml]\naxes:\n  - name: a\n    values:\n      - {{name: x}}\n"
        f"      - {{name: y, overlay: {overlay}}}\n",
    )
    grid = ablate.load_grid(str(path))
    with pytest.raises(UserError, match=message):
        ablate.check_overlays(grid, CONFIGS)


def test_bad_grids_and_requests_get_one_sentence(tmp_path, capsys):
    assert ablate_main(["run", "no-such-grid", "--config-dir", str(CONFIGS)]) == 2
    assert "no ablation grid 'no-such-grid'" in capsys.readouterr().err
    path = write_grid(tmp_path, GRID_2X2.format(mode="product", extra=""))
    assert ablate_main(["run", str(path), "--config-dir", str(CONFIGS), "--dry-run", "--max-cells", "4"]) == 2
    assert "has 8 cells, more than --max-cells 4; pass --yes" in capsys.readouterr().err
    assert ablate_main(["run", str(path), "--config-dir", str(CONFIGS), "--dry-run", "--cells", "fsq,nope"]) == 2
    assert "has no cell 'nope'" in capsys.readouterr().err
    assert (
        ablate_main(
            [
                "run",
                "paper-table4",
                "--config-dir",
                str(CONFIGS),
                "--dry-run",
                "--gpus",
                "3",
                "--results-dir",
                str(tmp_path / "r"),
            ]
        )
        == 2
    )
    assert "global batch 128 is not a multiple of 8 per device x 3 devices" in capsys.readouterr().err
    for text, message in (
        ("stack: [base.yaml]\n", "`axes` must be a list"),
        ("stack: [base.yaml]\ncells: random\naxes: [{name: a, values: [{name: x}]}]\n", "cells must be one of"),
        ("stack: [base.yaml]\naxes: [{name: a, kind: posttrain, values: [{name: x}]}]\n", "a posttrain axis needs"),
        ("stack: [base.yaml]\naxes: [{name: a, values: [{name: x}, {name: on}]}]\n", "quote it, e.g. name: 'on'"),
        (
            "stack: [base.yaml]\naxes: [{name: a, values: [{name: x}]}]\npaper: {zz: {psnr: 1}}\n",
            "paper numbers for \\['zz'\\]",
        ),
    ):
        with pytest.raises(UserError, match=message):
            ablate.load_grid(str(write_grid(tmp_path, text, name="bad")))


# ---------------------------------------------------------------------------------- SLURM
def test_slurm_scripts_of_a_two_node_grid(tmp_path):
    results = tmp_path / "results"
    assert (
        ablate_main(
            [
                "run",
                "paper-posttrain",
                "--config-dir",
                str(CONFIGS),
                "--results-dir",
                str(results),
                "--launcher",
                "slurm",
                "--nodes",
                "2",
                "--gpus-per-node",
                "8",
                "--partition",
                "gpu",
                "--time",
                "48:00:00",
                "--dry-run",
            ]
        )
        == 0
    )
    folder = results / "ablations" / "paper-posttrain" / "slurm"
    scripts = sorted(folder.glob("*.sbatch"))
    assert [p.name.split("-", 2)[1] for p in scripts] == ["fit", "test", "fit", "test", "fit", "test", "fit", "test"]
    fit = scripts[0].read_text()
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=48:00:00",
        "#SBATCH --signal=SIGUSR1@90",
        "#SBATCH --requeue",
    ):
        assert line in fit.splitlines()
    srun = next(line for line in fit.splitlines() if line.startswith("srun "))
    argv = shlex.split(srun)
    assert argv[1:4] == [sys.executable, "-m", "flowmo"] and argv[4] == "fit"
    assert argv[-2:] == ["--ckpt_path", "last"]  # a requeued job resumes
    assert argv[argv.index("--trainer.num_nodes") + 1] == "2" and argv[argv.index("--trainer.devices") + 1] == "8"
    assert argv[argv.index("--trainer.accumulate_grad_batches") + 1] == "1"  # 8 x 16 devices = 128
    posttrain = shlex.split(next(line for line in scripts[2].read_text().splitlines() if line.startswith("srun ")))
    assert posttrain[posttrain.index("--trainer.accumulate_grad_batches") + 1] == "1"  # 4 x 16 = 64
    assert "--signal" not in scripts[1].read_text()  # tests are not requeued mid-way
    submit = (folder / "submit.sh").read_text().splitlines()
    assert submit[4] == f"job_000=$(sbatch --parsable {scripts[0].name})"
    assert f"job_001=$(sbatch --parsable --dependency=afterok:$job_000 {scripts[1].name})" in submit
    assert f"job_002=$(sbatch --parsable --dependency=afterok:$job_000 {scripts[2].name})" in submit  # 1B after 1A
    assert f"job_003=$(sbatch --parsable --dependency=afterok:$job_002 {scripts[3].name})" in submit


# ---------------------------------------------------------------------------------- results
def _write_metrics(results: Path, run: str, report: dict) -> None:
    (results / run).mkdir(parents=True)
    (results / run / "metrics.json").write_text(json.dumps(report))


def test_one_seed_table_says_no_interval_and_keeps_the_paper_columns(tmp_path):
    results = tmp_path / "results"
    _write_metrics(
        results,
        "ablate-paper-table4-base-s0",
        {
            "metrics": {
                "rfid": 2.9,
                "psnr_paper": 20.6,
                "psnr": 20.9,
                "ssim": 0.61,
                "lpips_alex": 0.151,
                "lpips_vgg": 0.2,
                "codebook_used_fraction": 0.97,
            },
            "num_images": 50_000,
            "stand_ins": [],
            "bits_per_pixel": 0.0703,
        },
    )
    _write_metrics(
        results,
        "ablate-paper-table4-fsq-s0",
        {"test/rfid": 3.5, "psnr": 21.0, "lpips_vgg": 0.19, "num_images": 5000, "stand_ins": ["LPIPS-vgg"]},
    )
    timings = results / "ablations" / "paper-table4" / "timings.json"
    timings.parent.mkdir(parents=True)
    timings.write_text(
        json.dumps(
            {
                "fit:ablate-paper-table4-base-s0": {"seconds": 600.0},
                "test:base:s0": {"seconds": 60.0},
                "test:no_cfg:s0": {"seconds": 30.0},
            }
        )
    )
    assert ablate_main(["table", "paper-table4", "--config-dir", str(CONFIGS), "--results-dir", str(results)]) == 0
    folder = results / "ablations" / "paper-table4"
    table = (folder / "table.md").read_text()
    assert "One seed per cell (seed 0): no interval can be given" in table
    base = next(line for line in table.splitlines() if line.startswith("| base "))
    assert (
        "| 20.60 | – | 20.71 | 0.610 | – | 0.151 | – | 0.150 | 2.90 | – | 2.87 | 0.97 | – | 0.070 | 400365 | 11.0 |"
        in base
    )
    fsq = next(line for line in table.splitlines() if line.startswith("| fsq "))
    assert "| 21.00 | +0.40 |" in fsq  # one draw: a difference, no interval, no mark
    assert "STAND-IN" in fsq and "per-image PSNR" in fsq and "lpips_vgg" in fsq
    no_cfg = next(line for line in table.splitlines() if line.startswith("| no_cfg "))
    assert "not run yet" in no_cfg and "evaluation only: tests the checkpoints of paper-table4-base" in no_cfg
    assert "| 10.5 |" in no_cfg  # its test and the base fit it needed
    with (folder / "table.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["cell"] for r in rows] == [c.name for c in ablate.load_grid("paper-table4", CONFIGS).cells]
    assert rows[0]["psnr"] == "20.6" and rows[0]["seed"] == "0" and rows[0]["psnr_key"] == "psnr_paper"
    for metric in ("psnr", "ssim", "lpips", "rfid", "codebook"):
        assert (folder / f"{metric}.png").stat().st_size > 5000


def test_replicate_table_means_intervals_paired_deltas_missing_and_references(tmp_path):
    path = write_grid(tmp_path, GRID_2X2.format(mode="one-at-a-time", extra="seeds: [0, 1, 2]"))
    grid = ablate.load_grid(str(path))
    results = tmp_path / "results"
    base, fsq, on = [20.0, 21.0, 22.0], [21.0, 22.1, 22.9], [20.4, 21.6, None]  # fsq - base: 1.0, 1.1, 0.9
    references = {"pool8": {"label": "8x8 pool", "bits_per_pixel": 1.5, "psnr": 27.0, "ssim": 0.7}}
    for seed in range(3):
        _write_metrics(
            results,
            f"ablate-g-base-s{seed}",
            {"psnr": base[seed], "bits_per_pixel": 1.125, **({"references": references} if seed == 1 else {})},
        )
        _write_metrics(results, f"ablate-g-fsq-s{seed}", {"psnr": fsq[seed], "bits_per_pixel": 1.125})
        if on[seed] is not None:  # seed 2 of `on` failed: missing, not averaged
            _write_metrics(results, f"ablate-g-on-s{seed}", {"psnr": on[seed], "bits_per_pixel": 1.125})
    opts = ablate.Options(config_dir=str(CONFIGS), results_dir=str(results))
    ablate.write_results(grid, opts)
    folder = results / "ablations" / "g"
    table = (folder / "table.md").read_text()
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in table.splitlines() if line.startswith("| ")}
    t2 = 4.302653  # t(0.975, 2 degrees of freedom); t(0.975, 1) = 12.706205
    assert f"| {21.0:.2f} ± {t2 / math.sqrt(3):.2f} | – |" in rows["base"]  # sd 1
    assert (
        f"| {22.0:.2f} ± {t2 * math.sqrt(0.91) / math.sqrt(3):.2f} | +1.00 ± {t2 * 0.1 / math.sqrt(3):.2f} ✱ |"
        in rows["fsq"]
    )
    # two replicates: the interval over 2 seeds, the pair with seed 2 dropped from the difference
    assert (
        f"| 21.00 ± {12.706205 * math.sqrt(0.72) / math.sqrt(2):.2f} (2 of 3) | +0.50 ± "
        f"{12.706205 * math.sqrt(0.02) / math.sqrt(2):.2f} (2 of 3) |" in rows["on"]
    )
    assert "1 of 3 replicates missing" in rows["on"] and "✱" not in rows["on"]
    assert "| missing | missing |" in rows["nocfg"] and "not run yet" in rows["nocfg"]
    assert "| 27.00 | +6.00 ± 2.48 ✱ |" in rows["pool8"] and "| 1.500 |" in rows["pool8"]
    assert "mean over 3 seeds (0, 1, 2" in table and "✱ marks a Δ whose interval excludes 0" in table
    with (folder / "table.csv").open() as handle:
        raw = list(csv.DictReader(handle))
    assert [(r["cell"], r["seed"], r["psnr"]) for r in raw if r["cell"] in ("on", "pool8")] == [
        ("on", "0", "20.4"),
        ("on", "1", "21.6"),
        ("on", "2", ""),
        ("pool8", "", "27.0"),
    ]
    assert len(raw) == 4 * 3 + 1
    with (folder / "summary.csv").open() as handle:
        summary = {r["cell"]: r for r in csv.DictReader(handle)}
    assert float(summary["fsq"]["psnr_delta"]) == pytest.approx(1.0)
    assert summary["fsq"]["psnr_delta_excludes_0"] == "True" and summary["on"]["psnr_missing"] == "1"
    assert (folder / "psnr.png").stat().st_size > 5000


def _recording_python(tmp_path: Path, monkeypatch, fail: str | None = None) -> Path:
    """A stand-in interpreter for the runner's `python -m flowmo ...`: records each command line (and exits 1
    for a run name containing `fail`), so the scheduling is tested with real processes and no training."""
    calls = tmp_path / "calls.txt"
    script = tmp_path / "python"
    failing = f'case "$*" in *{fail}*) exit 1;; esac' if fail else ""
    script.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n{failing}\nexit 0\n')
    script.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(script))
    return calls


def test_tests_with_current_metrics_are_skipped(tmp_path, monkeypatch):
    calls = _recording_python(tmp_path, monkeypatch)
    grid = ablate.load_grid(str(write_grid(tmp_path, GRID_2X2.format(mode="one-at-a-time", extra=""))))
    opts = ablate.Options(runs_dir=str(tmp_path / "runs"), results_dir=str(tmp_path / "results"))
    steps = ablate.plan(grid, opts, [grid.cells[0]])
    ckpt = Path(steps[0].checkpoint)
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    _write_metrics(tmp_path / "results", "ablate-g-base-s0", {"psnr": 1.0})
    ablate.execute(grid, steps, opts)
    assert [line.split()[2] for line in calls.read_text().splitlines()] == ["fit"]
    ablate.execute(grid, steps, opts, force=True)
    assert [line.split()[2] for line in calls.read_text().splitlines()] == ["fit", "fit", "test"]
    timings = json.loads((tmp_path / "results" / "ablations" / "g" / "timings.json").read_text())
    assert set(timings) == {"fit:ablate-g-base-s0", "test:base:s0"}
    assert "==== " in (tmp_path / "runs" / "ablate-g-base-s0" / "fit.log").read_text()  # each attempt's header


def test_a_failed_replicate_stops_only_what_needs_it(tmp_path, monkeypatch):
    calls = _recording_python(tmp_path, monkeypatch, fail="ablate-g-fsq-s1")
    grid = ablate.load_grid(str(write_grid(tmp_path, GRID_2X2.format(mode="one-at-a-time", extra="seeds: [0, 1]"))))
    opts = ablate.Options(runs_dir=str(tmp_path / "runs"), results_dir=str(tmp_path / "results"))
    steps = ablate.plan(grid, opts)
    failed = ablate.execute(grid, steps, opts, jobs=2)
    assert [s.key for s in failed] == ["fit:ablate-g-fsq-s1"]
    ran = calls.read_text()
    assert "ablate-g-fsq-s0" in ran and "--run_name ablate-g-fsq-s1" in ran  # tried, failed
    assert "--run_name ablate-g-fsq-s1 " in ran and ran.count("ablate-g-fsq-s1") == 1  # its test never started
    assert len(ran.splitlines()) == len(steps) - 1


def test_jobs_beyond_the_cores_and_jobs_with_gpus_are_refused(tmp_path, capsys):
    from flowmo.ablate.launch import available_cores

    common = ["--config-dir", str(CONFIGS), "--results-dir", str(tmp_path / "r"), "--dry-run"]
    assert ablate_main(["run", "tiny", "--jobs", str(available_cores() + 1), *common]) == 2
    assert f"than this machine's {available_cores()} cores can run" in capsys.readouterr().err
    assert ablate_main(["run", "tiny", "--jobs", "0", *common]) == 2
    assert "--jobs must be at least 1" in capsys.readouterr().err
    if available_cores() > 1:
        assert ablate_main(["run", "paper-table4", "--jobs", "2", "--gpus", "8", *common]) == 2
        assert "would start 2 steps on the same 8 GPUs" in capsys.readouterr().err


def test_slurm_scripts_of_a_seeded_grid(tmp_path):
    path = write_grid(tmp_path, GRID_2X2.format(mode="product", extra="seeds: [0, 1]\nproduct_axes: [quant, post]"))
    results = tmp_path / "results"
    assert (
        ablate_main(
            [
                "run",
                str(path),
                "--config-dir",
                str(CONFIGS),
                "--results-dir",
                str(results),
                "--launcher",
                "slurm",
                "--gpus-per-node",
                "8",
                "--dry-run",
            ]
        )
        == 0
    )
    folder = results / "ablations" / "g" / "slurm"
    # <index>-<fit|test>-<run>.sbatch; a cell's test can share its fit's run name (base, fsq)
    scripts = {tuple(p.name.removesuffix(".sbatch").split("-", 2)[1:]): p for p in folder.glob("*.sbatch")}
    # 4 cells x 2 seeds: fits base, base-on (1B), fsq, fsq-on per seed; a test per cell and seed
    assert sorted(run for action, run in scripts if action == "fit") == sorted(
        f"ablate-g-{run}-s{seed}" for run in ("base", "base-on", "fsq", "fsq-on") for seed in (0, 1)
    )
    assert len(scripts) == 16
    submit = (folder / "submit.sh").read_text()
    job = {line.split("=")[0]: line for line in submit.splitlines() if line.startswith("job_")}
    variable = {key: next(v for v, line in job.items() if f" {path.name})" in line) for key, path in scripts.items()}
    for seed in (0, 1):
        one_b = scripts["fit", f"ablate-g-fsq-on-s{seed}"]
        line = job[variable["fit", f"ablate-g-fsq-on-s{seed}"]]
        assert f"--dependency=afterok:${variable['fit', f'ablate-g-fsq-s{seed}']} " in line  # 1B after the seed's 1A
        srun = shlex.split(next(line for line in one_b.read_text().splitlines() if line.startswith("srun ")))
        assert srun[srun.index("--model.seed") + 1] == str(seed)
        assert srun[srun.index("--model.init.weights") + 1] == f"runs/ablate-g-fsq-s{seed}/checkpoints/last.ckpt"
    test = job[variable["test", "ablate-g-fsq+on-s1"]]
    assert f"afterok:${variable['fit', 'ablate-g-fsq-on-s1']} " in test  # the seed's own 1B checkpoint


# ---------------------------------------------------------------------------------- the module side
def _tiny(**kwargs) -> FlowMoModule:
    return module_with(**{"preset": "tiny", "perceptual": "none", "feature_weights": "random", **kwargs})


def _fit(model: FlowMoModule, steps: int = 2) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        log_every_n_steps=1,
    )
    trainer.fit(model, torch.utils.data.DataLoader(torch.rand(8, 3, 32, 32) * 2 - 1, batch_size=4))
    return trainer


def test_encoder_only_init_keeps_a_fresh_decoder_and_freezes_the_encoder(tmp_path):
    torch.manual_seed(0)
    pretrained = FlowMoTokenizer.from_preset("tiny")
    path = export_tokenizer(pretrained, tmp_path / "pretrained.pt")
    torch.manual_seed(1)
    model = _tiny(weights=str(path), parts="encoder", freeze_encoder_after=0)
    for ours, theirs in zip(model.tokenizer.encoder.parameters(), pretrained.encoder.parameters()):
        assert torch.equal(ours, theirs)
    assert not torch.equal(model.tokenizer.decoder.img_in.weight, pretrained.decoder.img_in.weight)
    before = [p.clone() for p in model.tokenizer.parameters()]
    _fit(model)
    moved = [not torch.equal(a, b) for a, b in zip(before, model.tokenizer.parameters())]
    encoder_count = len(list(model.tokenizer.encoder.parameters()))
    assert not any(moved[:encoder_count]) and any(moved[encoder_count:])  # encoder frozen from step 0
    with pytest.raises(ValueError, match="init.parts"):
        _tiny(parts="encoder")


def test_the_fsq_cell_trains():
    model = _tiny(architecture={"quantizer": "fsq", "code_dim": 6, "fsq_levels": [8] * 6})
    _fit(model)
    assert model.config.bits_per_token == 18


def _fast_grid_folder(tmp_path: Path, max_steps: int, model: str = "", extra: str = "") -> None:
    """A folder to run grids in: configs/ (linked), a small sample set, fast.yaml (tiny fits on it; `model`: more
    model lines, `extra`: more top-level sections) and eval.yaml (a 3-step sampler)."""
    from flowmo.data.sample_set import build_sample_set

    build_sample_set(tmp_path / "sample", size=32, train_crops_per_photo=2, val_crops_per_photo=1, shard_size=8)
    (tmp_path / "configs").symlink_to(CONFIGS)
    (tmp_path / "fast.yaml").write_text(
        f"data:\n  train_shards: {tmp_path}/sample/train.json\n  val_shards: {tmp_path}/sample/val.json\n"
        "  image_size: 32\n  batch_size: 2\n  shuffle_buffer: 4\nmodel:\n  loss:\n    perceptual: none\n"
        + model
        + f"trainer:\n  max_steps: {max_steps}\n  limit_val_batches: 0\n  enable_progress_bar: false\n"
        "  enable_model_summary: false\n" + extra
    )
    (tmp_path / "eval.yaml").write_text("model:\n  eval:\n    sampler:\n      steps: 3\n")


@pytest.mark.slow
def test_a_two_by_two_grid_with_post_training_runs_end_to_end(tmp_path):
    """fit, 1B hand-off, test, table, PNG and HParams, for real: 2 quantizers x {1A only, + 1B}, 2 steps each."""
    _fast_grid_folder(tmp_path, max_steps=2, model="    chain_steps: 2\n    sample_weight: 1.0\n")
    grid = write_grid(
        tmp_path,
        f"""
stack: [base.yaml, model/tiny.yaml, stage/1a.yaml, data/sample.yaml, demo.yaml, {tmp_path}/fast.yaml]
eval_stack: [ablations/overlays/tiny-eval.yaml, {tmp_path}/eval.yaml]
posttrain:
  stack: [base.yaml, model/tiny.yaml, stage/1b.yaml, data/sample.yaml, demo.yaml, {tmp_path}/fast.yaml]
cells: product
feature_metrics: auto
axes:
  - name: quantizer
    values:
      - {{name: lfq}}
      - {{name: fsq, overlay: {{model: {{architecture: {{quantizer: fsq, code_dim: 6,
                                                  fsq_levels: [8, 8, 8, 8, 8, 8]}}}}}}}}
  - name: posttrain
    kind: posttrain
    values:
      - {{name: 1a}}
      - {{name: 1b, overlay: {{model: {{loss: {{sample_loss: pixel_mse}}}}, data: {{batch_size: 1}}}}}}
""",
        name="two",
    )
    command = [sys.executable, "-m", "flowmo", "ablate", "run", str(grid), "--config-dir", "configs"]
    subprocess.run(command, cwd=tmp_path, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    folder = tmp_path / "results" / "ablations" / "two"
    with (folder / "table.csv").open() as handle:
        rows = {r["cell"]: r for r in csv.DictReader(handle)}
    assert list(rows) == ["base", "1b", "fsq", "fsq+1b", "mean_colour", "pool8", "equal_bit"]
    for name in ("base", "1b", "fsq", "fsq+1b"):
        row = rows[name]
        assert 0 < float(row["psnr"]) < 60 and float(row["wall_min"]) > 0 and row["notes"] == "" and row["seed"] == "0"
    assert rows["fsq+1b"]["steps"] == "2+2"
    # the references were scored by the tests on the same held-out crops: 18 bits/token x 16 tokens / 32^2 px
    assert rows["equal_bit"]["bits_per_pixel"] == "0.1875" and float(rows["pool8"]["bits_per_pixel"]) == 1.5
    assert float(rows["mean_colour"]["psnr"]) < float(rows["pool8"]["psnr"])
    one_b = json.loads((tmp_path / "results" / "ablate-two-fsq+1b-s0" / "metrics.json").read_text())
    assert one_b["init_weights"] == "runs/ablate-two-fsq-1b-s0/checkpoints/last.ckpt"
    assert set(one_b["references"]) == {"mean_colour", "pool8", "equal_bit"}
    hand_off = torch.load(tmp_path / "runs" / "ablate-two-fsq-1b-s0" / "checkpoints" / "last.ckpt", weights_only=False)
    assert hand_off["hyper_parameters"]["init"]["weights"] == "runs/ablate-two-fsq-s0/checkpoints/last.ckpt"
    assert hand_off["hyper_parameters"]["stage"] == "1b"
    assert (folder / "psnr.png").stat().st_size > 5000
    assert "evaluation report:" in (tmp_path / "runs" / "ablate-two-fsq+1b-s0" / "test.log").read_text()  # its log
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(tmp_path / "runs" / "ablate-two-fsq+1b-s0" / "hparams"))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = {k: v.string_value or v.number_value for k, v in session.session_start_info.hparams.items()}
    assert hparams == {"grid": "two", "cell": "fsq+1b", "seed": 0, "quantizer": "fsq", "posttrain": "1b"}
    assert events.Scalars("hparam/psnr")[0].value == pytest.approx(float(rows["fsq+1b"]["psnr"]), abs=1e-4)


def _wait_for(condition, what: str, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.slow
def test_two_cells_run_in_parallel_and_resume_after_the_runner_is_killed(tmp_path):
    """--jobs 2: both fits run at once (one thread each); SIGKILL to the runner's whole process group mid-fit
    (as when a node dies), then the same command resumes the fits from their checkpoints and finishes the table."""
    from flowmo.ablate.launch import available_cores

    if available_cores() < 2:
        pytest.skip("--jobs 2 needs 2 cores")
    _fast_grid_folder(tmp_path, max_steps=400, extra="checkpoint:\n  every_n_train_steps: 20\n")
    grid = write_grid(
        tmp_path,
        f"""
stack: [base.yaml, model/tiny.yaml, stage/1a.yaml, data/sample.yaml, demo.yaml, {tmp_path}/fast.yaml]
eval_stack: [ablations/overlays/tiny-eval.yaml, {tmp_path}/eval.yaml]
per_image_metrics: true
axes:
  - name: schedule
    values:
      - {{name: noise_weighted}}
      - {{name: uniform, overlay: {{model: {{loss: {{time_schedule: uniform}}}}}}}}
""",
        name="par",
    )
    command = [sys.executable, "-m", "flowmo", "ablate", "run", str(grid), "--config-dir", "configs", "--jobs", "2"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = tmp_path / "runner.txt"
    with out.open("w") as handle:
        runner = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
    checkpoints = [
        tmp_path / "runs" / f"ablate-par-{run}-s0" / "checkpoints" / "last.ckpt" for run in ("base", "uniform")
    ]
    _wait_for(lambda: all(c.is_file() for c in checkpoints) or runner.poll() is not None, "both fits' checkpoints")
    os.killpg(runner.pid, signal.SIGKILL)  # the runner and both fits, at once
    runner.wait()
    first = out.read_text()
    assert first.count("started (1 thread(s))") == 2 and "done" not in first  # both fits ran side by side
    _wait_for(lambda: not _group_alive(runner.pid), "the killed process group to be gone", 30)
    assert not (tmp_path / "results" / "ablations" / "par" / "table.md").exists()
    killed_at = {c.parent.parent.name: torch.load(c, weights_only=False)["global_step"] for c in checkpoints}
    assert all(0 < step < 400 for step in killed_at.values()), killed_at

    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for run in killed_at:
        log = (tmp_path / "runs" / run / "fit.log").read_text()
        assert log.count("==== ") == 2 and "Restoring states from the checkpoint" in log  # resumed, not restarted
        assert (
            torch.load(tmp_path / "runs" / run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 400
        )
    with (tmp_path / "results" / "ablations" / "par" / "table.csv").open() as handle:
        rows = {r["cell"]: r for r in csv.DictReader(handle)}
    assert 0 < float(rows["base"]["psnr"]) < 60 and 0 < float(rows["uniform"]["psnr"]) < 60


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs (zombies awaiting a reaper do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def test_fsq_at_72_bits_trains_without_token_ids():
    """The tiny grid's FSQ cell: 24 channels of 8 levels = 8^24 codes per token, more than an int64 id holds."""
    model = _tiny(architecture={"quantizer": "fsq", "code_dim": 24, "fsq_levels": [8] * 24})
    _fit(model)
    assert model.config.bits_per_token == 72 and model.tokenizer.quantize(torch.randn(1, 16, 24)).indices is None
    with pytest.raises(ValueError, match="no token ids"):
        model.tokenizer.tokenize(torch.zeros(1, 3, 32, 32))
