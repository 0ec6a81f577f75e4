"""`flowmo demo` / `make demo`: the whole pipeline on a CPU in minutes, on photos the model never saw.

demo sample set -> Stage 1A (`demo` preset) -> Stage 1B from the 1A EMA weights -> reconstruction of the
held-out photos with the paper's sampler -> results/demo/{grid.png, curves.png, metrics.json} and a table.

Training goes through the same LightningCLI and config files as a paper-scale run (configs/demo.yaml holds
the CPU-sized recipe and says why each number differs from the paper), so the demo also checks that those work.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from flowmo import pretrained
from flowmo.checkpoint import from_checkpoint
from flowmo.commands.lightning import FlowMoCLI
from flowmo.data.datamodule import FlowMoDataModule
from flowmo.data.sample_set import ensure_sample_data
from flowmo.figures import read_scalars, reconstruction_figure, training_curves_figure
from flowmo.flow import SAMPLERS
from flowmo.metrics import ReconstructionMetrics
from flowmo.metrics.image import psnr_per_image, to_unit_range
from flowmo.nn.tokenizer import FlowMoTokenizer
from flowmo.references import POOL_GRID, mean_colour, pool_reference

# The repository's configs/ (editable install), else ./configs: the demo runs from any working directory.
_REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CONFIGS = _REPO_CONFIGS if _REPO_CONFIGS.is_dir() else Path("configs")
STAGES = {"1a": "Stage 1A", "1b": "Stage 1B"}


# ------------------------------------------------------------------------------------------- losses
def stage_losses(choice: str) -> dict:
    """Which perceptual losses the two stages use, and what the report must say about them.

    Stage 1A: LPIPS-VGG (paper) or none. Stage 1B: ResNet-50 logits (paper) or the pixel MSE of the chain
    sample (a random ResNet would give the chain a target with no meaning; pixel MSE seeks the input itself).
    "auto" uses the pretrained nets only when their files are already cached: the demo never downloads, so its
    recipe (and its measured figures) do not change with the network a laptop happens to have.
    """
    names = {key: pretrained.FILES[key].label for key in ("vgg16", "resnet50")}
    missing = [key for key in names if not pretrained.is_available(key)]
    if choice == "pretrained" and missing:
        raise SystemExit(
            f"flowmo demo --feature-weights pretrained: {', '.join(names[k] for k in missing)} not in "
            "their caches; `flowmo fetch-weights lpips resnet` fetches them, or use --feature-weights auto."
        )
    use_vgg = choice == "pretrained" or (choice == "auto" and "vgg16" not in missing)
    use_resnet = choice == "pretrained" or (choice == "auto" and "resnet50" not in missing)
    notes = []
    if not use_vgg:
        notes.append(f"Stage 1A without its LPIPS-VGG term ({names['vgg16']} not used)")
    if not use_resnet:
        notes.append(
            f"Stage 1B sample loss = pixel MSE of the 8-step chain sample, not ResNet-50 logits "
            f"({names['resnet50']} not used)"
        )
    if notes:
        print("demo: !!! " + "; ".join(notes) + ". Recorded in metrics.json as substitutes. !!!")
    # The paper weighs ResNet logits by 0.01. The pixel MSE gets 10: from one 1A checkpoint, 300 Stage-1B steps
    # reached 22.35 / 22.86 / 22.96 / 22.98 dB held-out PSNR with weights 1 / 4 / 10 / 30.
    return {
        "perceptual_1a": "lpips_vgg" if use_vgg else "none",
        "sample_loss_1b": "resnet50_logits" if use_resnet else "pixel_mse",
        "sample_weight_1b": 0.01 if use_resnet else 10.0,
        "substitutes": notes,
    }


# ------------------------------------------------------------------------------------------- data
def validation_images(data_dir: Path, image_size: int) -> torch.Tensor:
    data = FlowMoDataModule(
        train_shards=None,
        val_shards=str(data_dir / "val.json"),
        image_size=image_size,
        batch_size=16,
        num_workers=0,
        pin_memory=False,
        persistent_workers=False,
    )
    data.setup("validate")
    return torch.cat([batch["image"] for batch in data.val_dataloader()])


# ------------------------------------------------------------------------------------------- training
def run_stage(stage: str, args: argparse.Namespace, extra: list[str]) -> Path:
    """One `flowmo fit` of the demo; returns its last checkpoint."""
    run_name = f"demo-{stage}"
    # a fresh demo, not a resume: --overwrite moves an earlier demo's run aside (runs/demo-*/superseded-<time>/)
    cli_args = [
        "fit",
        "--overwrite",
        "-c",
        str(CONFIGS / "base.yaml"),
        "-c",
        str(CONFIGS / "model/demo.yaml"),
        "-c",
        str(CONFIGS / f"stage/{stage}.yaml"),
        "-c",
        str(CONFIGS / "data/sample.yaml"),
        "-c",
        str(CONFIGS / "demo.yaml"),
        "--run_name",
        run_name,
        "--runs_dir",
        args.runs_dir,
        "--data.train_shards",
        str(Path(args.data) / "train.json"),
        "--data.val_shards",
        str(Path(args.data) / "val.json"),
        "--data.image_size",
        str(args.image_size),
        "--seed_everything",
        str(args.seed),
        "--model.seed",
        str(args.seed),
        "--data.seed",
        str(args.seed),
        "--trainer.val_check_interval",
        str(args.val_every if stage == "1a" else args.val_every_1b),
        *extra,
    ]
    print(f"demo: {STAGES[stage]}: flowmo " + " ".join(cli_args))
    FlowMoCLI(args=cli_args)
    return Path(args.runs_dir) / run_name / "checkpoints" / "last.ckpt"


# ------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def reconstruct(tokenizer: FlowMoTokenizer, images: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Paper sampler (25 steps, rho 4, CFG 1.5 on the interval), the same noise for every tokenizer."""
    tokenizer.eval()
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    quantized = tokenizer.quantize(tokenizer.encode(images), with_losses=False)
    return tokenizer.sample_with(SAMPLERS["paper"], quantized.codes, noise), quantized.indices


def mean_psnr(images: torch.Tensor, other: torch.Tensor) -> float:
    return float(row_psnr(images, other).mean())


def row_psnr(images: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    return psnr_per_image(to_unit_range(images), to_unit_range(other))


def evaluate(tokenizer: FlowMoTokenizer, images: torch.Tensor, seed: int) -> tuple[dict, torch.Tensor]:
    reconstructions, indices = reconstruct(tokenizer, images, seed)
    metrics = ReconstructionMetrics(
        lpips_nets=pretrained.cached_lpips_nets(), fid_feature=False, codebook_bits=tokenizer.quantizer.id_bits
    )
    metrics.update(reconstructions, images, indices)
    return metrics.compute(), reconstructions


# ------------------------------------------------------------------------------------------- the demo
def run_demo(args: argparse.Namespace) -> int:
    """The demo on parsed arguments (flowmo.commands.demo owns them)."""
    started = time.time()
    torch.manual_seed(args.seed)
    data_dir, out_dir = Path(args.data), Path(args.out)
    ensure_sample_data(data_dir, args.image_size, args.train_crops, args.val_crops, args.colour_jitter)
    losses = stage_losses(args.feature_weights)
    ckpt_1a = run_stage(
        "1a",
        args,
        ["--trainer.max_steps", str(args.steps_1a), "--model.loss.perceptual", losses["perceptual_1a"], *args.fit_1a],
    )
    ckpt_1b = run_stage(
        "1b",
        args,
        [
            "--trainer.max_steps",
            str(args.steps_1b),
            "--model.optim.lr",
            str(args.lr_1b),
            "--data.batch_size",
            str(args.batch_1b),
            "--model.loss.sample_loss",
            losses["sample_loss_1b"],
            "--model.loss.sample_weight",
            str(losses["sample_weight_1b"]),
            "--model.init.weights",
            str(ckpt_1a),
            *args.fit_1b,
        ],
    )
    images = validation_images(data_dir, args.image_size)
    results, reconstructions = {}, {}
    for stage, path in (("1a", ckpt_1a), ("1b", ckpt_1b)):
        tokenizer = from_checkpoint(path, weights="ema")
        values, reconstructions[stage] = evaluate(tokenizer, images, args.seed)
        results.update({f"{name}_{stage}": value for name, value in values.items()})
    results["bits_per_pixel"] = tokenizer.config.bits_per_pixel  # both stages share the architecture
    report = write_report(out_dir, results, images, reconstructions, losses, started, args)
    print_table(report)
    return 0


def write_report(
    out_dir: Path,
    results: dict,
    images: torch.Tensor,
    reconstructions: dict,
    losses: dict,
    started: float,
    args: argparse.Namespace,
) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    pooled = pool_reference(images)
    baselines = {
        "mean colour": mean_psnr(images, mean_colour(images)),
        f"{POOL_GRID}x{POOL_GRID} pool": mean_psnr(images, pooled),
    }
    rows = torch.linspace(0, images.shape[0] - 1, min(args.rows, images.shape[0])).round().long()
    columns = {
        "input": images[rows],
        f"{POOL_GRID}x{POOL_GRID} pool": pooled[rows],
        **{STAGES[stage]: recon[rows] for stage, recon in reconstructions.items()},
    }
    row_values = {label: row_psnr(images[rows], columns[label]) for label in list(columns)[1:]}
    reconstruction_figure(
        out_dir / "grid.png",
        columns,
        row_values,
        title=f"held-out photos, {args.image_size} px, EMA weights, paper sampler; PSNR per row",
    )
    stages = {
        STAGES[stage]: read_scalars(Path(args.runs_dir) / f"demo-{stage}", ("train/flow", "val/psnr"))
        for stage in reconstructions
    }
    target = {"mean colour + 3 dB (the demo's bar)": baselines["mean colour"] + 3.0}
    training_curves_figure(out_dir / "curves.png", stages, {**baselines, **target})
    report = {
        **results,
        "psnr_mean_colour_baseline": baselines["mean colour"],
        "psnr_pool8_baseline": baselines[f"{POOL_GRID}x{POOL_GRID} pool"],
        "val_images": int(images.shape[0]),
        "image_size": int(images.shape[-1]),
        "seed": args.seed,
        "steps_1a": args.steps_1a,
        "steps_1b": args.steps_1b,
        "perceptual_1a": losses["perceptual_1a"],
        "sample_loss_1b": losses["sample_loss_1b"],
        "sample_weight_1b": losses["sample_weight_1b"],
        "substitutes": losses["substitutes"],
        "stand_ins": [],  # no random-weight network runs in the demo any more; substitutes says what replaced them
        "sampler": {**SAMPLERS["paper"].to_dict(), "seed": args.seed},
        "grid": str(out_dir / "grid.png"),
        "grid_columns": list(columns),
        "curves": str(out_dir / "curves.png"),
        "wall_s": round(time.time() - started, 1),
    }
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def print_table(report: dict) -> None:
    print(
        f"\nFlowMo demo: {report['val_images']} crops of held-out photos, EMA weights, paper sampler "
        "(25 steps, rho 4, CFG 1.5)"
    )
    print(f"{'':28}{'Stage 1A':>10}{'Stage 1B':>10}")
    for name in ("psnr", "ssim", "lpips_vgg", "codebook_used_fraction"):
        if f"{name}_1a" in report:
            print(f"{name:28}{report[f'{name}_1a']:10.4f}{report[f'{name}_1b']:10.4f}")
    print(f"{'psnr, mean-colour guess':28}{report['psnr_mean_colour_baseline']:10.4f}")
    print(f"{'psnr, 8x8 average pool':28}{report['psnr_pool8_baseline']:10.4f}")
    for note in report["substitutes"]:
        print(f"substitute: {note}")
    print(
        f"grid: {report['grid']}   curves: {report['curves']}   "
        f"metrics: {Path(report['grid']).with_name('metrics.json')}   wall time: {report['wall_s']} s"
    )
