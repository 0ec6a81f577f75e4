"""`flowmo demo` / `make demo`: the whole pipeline, tiny, on the embedded sample set, on a CPU in minutes.

sample shards -> Stage 1A (tiny preset) -> Stage 1B from the 1A EMA weights -> reconstruction of the
held-out photos with the paper's sampler -> results/demo/{grid.png, metrics.json} and a printed table.

Training goes through the same LightningCLI and config files as a paper-scale run (configs/demo.yaml
holds the few CPU-sized differences), so the demo also checks that those work.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from torchvision.utils import save_image

from flowmo.callbacks.images import side_by_side
from flowmo.data.datamodule import FlowMoDataModule
from flowmo.data.sample_set import build_sample_set
from flowmo.metrics import ReconstructionMetrics
from flowmo.metrics.image import psnr_per_image, to_unit_range
from flowmo.nn.tokenizer import PAPER_SAMPLER, FlowMoTokenizer
from flowmo.perceptual import WEIGHT_FILES, MissingWeightsError, resolve_weights

# The repository's configs/ (editable install), else ./configs: the demo runs from any working directory.
_REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CONFIGS = _REPO_CONFIGS if _REPO_CONFIGS.is_dir() else Path("configs")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="flowmo demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/demo", help="where grid.png and metrics.json go")
    parser.add_argument("--data", default="data/sample", help="sample shards (built here if missing)")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--steps-1a", type=int, default=2500)
    parser.add_argument("--steps-1b", type=int, default=30)
    parser.add_argument("--freeze-encoder-after", type=int, default=2000)
    parser.add_argument("--lr-1b", type=float, default=1e-4)
    parser.add_argument("--batch-1b", type=int, default=4, help="Stage-1B batch (ResNet-50 at 224 px is the cost)")
    parser.add_argument("--feature-weights", choices=("auto", "random", "pretrained"), default="auto",
                        help="auto: pretrained LPIPS/ResNet files when cached, else loud random stand-ins")
    parser.add_argument("--rows", type=int, default=12, help="images in the grid")
    return parser.parse_args(argv)


def feature_weights_choice(choice: str) -> str | None:
    """None (pretrained from the cache) or "random"; `auto` checks the cache and says what it found."""
    if choice != "auto":
        return None if choice == "pretrained" else "random"
    missing = [WEIGHT_FILES[key] for key in ("vgg16", "resnet50") if not is_cached(key)]
    if not missing:
        print("demo: pretrained LPIPS-VGG and ResNet-50 weights found; using them.")
        return None
    print(f"demo: !!! pretrained feature nets missing ({', '.join(missing)}): Stage 1A runs WITHOUT its LPIPS "
          "term (a random VGG only adds texture noise) and Stage 1B's ResNet-50 loss uses RANDOM stand-in weights "
          "(it still exercises the back-propagated 8-step chain). Recorded in metrics.json as stand_ins. !!!")
    return "random"


def is_cached(key: str) -> bool:
    """Whether the pretrained file of feature net `key` (a WEIGHT_FILES key) is in the torch hub cache."""
    try:
        resolve_weights(key, None, what=key)
    except MissingWeightsError:
        return False
    return True


def ensure_sample_data(data_dir: Path) -> None:
    if not (data_dir / "train.json").is_file() or not (data_dir / "val.json").is_file():
        print(f"demo: building the sample set in {data_dir}")
        build_sample_set(data_dir)


def run_stage(stage: str, args: argparse.Namespace, feature_weights: str | None, extra: list[str]) -> Path:
    """One `flowmo fit` of the demo; returns its last checkpoint."""
    from flowmo.cli import FlowMoCLI

    run_name = f"demo-{stage}"
    shutil.rmtree(Path(args.runs_dir) / run_name, ignore_errors=True)  # a fresh demo, not a resume
    cli_args = ["fit", "-c", str(CONFIGS / "base.yaml"), "-c", str(CONFIGS / "model/tiny.yaml"),
                "-c", str(CONFIGS / f"stage/{stage}.yaml"), "-c", str(CONFIGS / "data/sample.yaml"),
                "-c", str(CONFIGS / "demo.yaml"), "--run_name", run_name, "--runs_dir", args.runs_dir,
                "--data.train_shards", str(Path(args.data) / "train.json"),
                "--data.val_shards", str(Path(args.data) / "val.json"),
                "--model.feature_weights", "random" if feature_weights == "random" else "null",
                "--trainer.accumulate_grad_batches", "1", *extra]
    print(f"demo: Stage {stage.upper()}: flowmo " + " ".join(cli_args))
    FlowMoCLI(args=cli_args)
    return Path(args.runs_dir) / run_name / "checkpoints" / "last.ckpt"


def validation_images(data_dir: Path, image_size: int) -> torch.Tensor:
    data = FlowMoDataModule(train_shards=None, val_shards=str(data_dir / "val.json"), image_size=image_size,
                            batch_size=16, num_workers=0, pin_memory=False, persistent_workers=False)
    data.setup("validate")
    return torch.cat([batch["image"] for batch in data.val_dataloader()])


@torch.no_grad()
def reconstruct(tokenizer: FlowMoTokenizer, images: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Paper sampler (25 steps, rho 4, CFG 1.5 on the interval), the same noise for every tokenizer."""
    tokenizer.eval()
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    quantized = tokenizer.quantize(tokenizer.encode(images), with_losses=False)
    return tokenizer.sample(quantized.codes, noise, **PAPER_SAMPLER), quantized.indices


def mean_colour_baseline(images: torch.Tensor) -> float:
    """PSNR of replacing each image by its mean colour: the scale against which the demo's PSNR reads."""
    flat = images.mean(dim=(2, 3), keepdim=True).expand_as(images)
    return float(psnr_per_image(to_unit_range(images), to_unit_range(flat)).mean())


def evaluate(tokenizer: FlowMoTokenizer, images: torch.Tensor, feature_weights: str | None) -> tuple[dict, torch.Tensor]:
    reconstructions, indices = reconstruct(tokenizer, images)
    lpips_nets = () if feature_weights == "random" else ("alex", "vgg")
    metrics = ReconstructionMetrics(lpips_nets=_available(lpips_nets), fid_feature=False,
                                    codebook_bits=tokenizer.config.entropy_group_bits)
    metrics.update(images, reconstructions, indices)
    return metrics.compute(), reconstructions


def _available(nets: tuple[str, ...]) -> tuple[str, ...]:
    keys = {"alex": "alexnet", "vgg": "vgg16"}
    for net in nets:
        if not is_cached(keys[net]):
            print(f"demo: LPIPS-{net} weights not cached; LPIPS-{net} not reported.")
    return tuple(net for net in nets if is_cached(keys[net]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    torch.manual_seed(0)
    data_dir, out_dir = Path(args.data), Path(args.out)
    ensure_sample_data(data_dir)
    feature_weights = feature_weights_choice(args.feature_weights)
    no_lpips = ["--model.perceptual", "none"] if feature_weights == "random" else []
    ckpt_1a = run_stage("1a", args, feature_weights, ["--trainer.max_steps", str(args.steps_1a),
                                                      "--model.freeze_encoder_after", str(args.freeze_encoder_after),
                                                      *no_lpips])
    ckpt_1b = run_stage("1b", args, feature_weights, ["--trainer.max_steps", str(args.steps_1b),
                                                      "--data.batch_size", str(args.batch_1b),
                                                      "--model.lr", str(args.lr_1b),
                                                      "--model.init_weights", str(ckpt_1a)])
    tokenizers = {stage: FlowMoTokenizer.from_checkpoint(path, weights="ema")
                  for stage, path in (("1a", ckpt_1a), ("1b", ckpt_1b))}
    images = validation_images(data_dir, tokenizers["1a"].config.image_size)
    results, columns = {}, [images]
    for stage, tokenizer in tokenizers.items():
        values, reconstructions = evaluate(tokenizer, images, feature_weights)
        results.update({f"{name}_{stage}": value for name, value in values.items()})
        columns.append(reconstructions)
    report = write_report(out_dir, results, columns, images, feature_weights, started, args)
    print_table(report)
    return 0


def write_report(out_dir, results, columns, images, feature_weights, started, args) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = torch.linspace(0, images.shape[0] - 1, min(args.rows, images.shape[0])).long()  # every held-out photo
    save_image(side_by_side([column[rows] for column in columns], max_rows=args.rows), out_dir / "grid.png")
    report = {
        **results,
        "psnr_mean_colour_baseline": mean_colour_baseline(images),
        "val_images": int(images.shape[0]),
        "image_size": int(images.shape[-1]),
        "steps_1a": args.steps_1a,
        "steps_1b": args.steps_1b,
        "sampler": {**PAPER_SAMPLER, "cfg_interval": list(PAPER_SAMPLER["cfg_interval"]), "seed": 0},
        "stand_ins": ["LPIPS-VGG absent: Stage 1A trained without its perceptual term",
                      "ResNet-50 logits (Stage 1B loss): random weights"] if feature_weights else [],
        "grid": str(out_dir / "grid.png"),
        "grid_columns": ["input", "Stage 1A reconstruction", "Stage 1B reconstruction"],
        "wall_s": round(time.time() - started, 1),
    }
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def print_table(report: dict) -> None:
    print("\nFlowMo demo: held-out sample photos, EMA weights, paper sampler (25 steps, rho 4, CFG 1.5)")
    print(f"{'':28}{'Stage 1A':>10}{'Stage 1B':>10}")
    for name in ("psnr", "ssim", "lpips_vgg", "codebook_used_fraction"):
        if f"{name}_1a" in report:
            print(f"{name:28}{report[f'{name}_1a']:10.4f}{report[f'{name}_1b']:10.4f}")
    print(f"{'psnr, mean-colour baseline':28}{report['psnr_mean_colour_baseline']:10.4f}")
    if report["stand_ins"]:
        print("stand-in (random) feature nets: " + ", ".join(report["stand_ins"]))
    print(f"grid: {report['grid']}   metrics: {Path(report['grid']).with_name('metrics.json')}   "
          f"wall time: {report['wall_s']} s")


if __name__ == "__main__":
    raise SystemExit(main())
