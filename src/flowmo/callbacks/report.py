"""EvaluationReport: after `flowmo test`, write what a reader needs to trust and compare the numbers.

    results/<name>/metrics.json     every metric, the sampler settings, bits per pixel, images evaluated and
                                    skipped, weights (EMA/raw), checkpoint, config, stand-in nets, wall time,
                                    versions
    results/<name>/table_row.md     a row in the column order of the paper's Table 1 (method §7.1)
    results/<name>/reconstructions.png   the first test batch, input | reconstruction

Table 1 compatibility (method §7): the PSNR/SSIM columns take `psnr_paper` / `ssim_paper` (the authors' uint8
truncation, PSNR pooled over batches of 5); the correct per-image `psnr` / `ssim` are given beside them. The
LPIPS column takes AlexNet (the paper's magnitudes suggest it, method §10); VGG is given beside it. Numbers
computed with random stand-in feature nets say so in the JSON and in the row: they mean nothing.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torchvision.utils import save_image

from flowmo import __version__
from flowmo.callbacks.images import side_by_side
from flowmo.references import ReferenceScores

TABLE_HEADER = "| tokenizer | BPP | tokens × vocab | rFID↓ | PSNR↑ | SSIM↑ | LPIPS↓ |\n|---|---|---|---|---|---|---|"


class EvaluationReport(L.Callback):
    """Writes results/<name>/{metrics.json, table_row.md, reconstructions.png} when `trainer.test` ends.

    name: defaults to the run name (`--run_name`, the last part of the trainer's default_root_dir).
    """

    def __init__(self, out_dir: str = "results", name: str | None = None, grid_rows: int = 8) -> None:
        self.out_dir, self.name, self.grid_rows = out_dir, name, grid_rows
        self._reset()

    def _reset(self) -> None:
        self._start, self._images, self._grid, self._resolution = time.perf_counter(), 0, None, None
        self._references: ReferenceScores | None = None

    def on_test_start(self, trainer, pl_module) -> None:
        self._reset()
        size = evaluated_size(trainer, pl_module.config)  # the reference codecs at the tokenizer's rate at this size
        self._references = ReferenceScores(pl_module.config.bits_per_pixel_at(size, size), size, pl_module.device)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not isinstance(outputs, dict) or "images" not in outputs:
            return
        images = outputs["images"]
        self._images += images.shape[0]
        self._resolution = tuple(images.shape[-2:])
        if self._references is not None and images.shape[-1] == self._references.image_size:
            self._references.update(images)
        if self._grid is None and trainer.is_global_zero:  # first batch of rank 0: the same images every run
            self._grid = side_by_side([images.float().cpu(), outputs["reconstructions"].float().cpu()], self.grid_rows)

    def on_test_end(self, trainer, pl_module) -> None:
        # every rank takes part in the sums; only rank 0 writes
        skipped = getattr(trainer.datamodule, "skipped_samples", 0)
        counts = torch.tensor([self._images, skipped], dtype=torch.int64, device=pl_module.device)
        num_images, skipped = (int(n) for n in trainer.strategy.reduce(counts, reduce_op="sum").tolist())
        references = self._references.compute() if self._references is not None else {}
        if not trainer.is_global_zero:
            return
        report = build_report(
            trainer,
            pl_module,
            num_images=num_images,
            resolution=self._resolution,
            wall_time_s=time.perf_counter() - self._start,
        )
        report["skipped_samples"] = skipped
        report["references"] = references  # trivial codecs on the same images (flowmo.references)
        expected = getattr(trainer.datamodule, "expected_images", lambda split: None)("test")
        if expected is not None and num_images < expected:  # read errors count shards; this counts images
            report["images_lost"] = expected - num_images
            lost = (
                f"{expected - num_images} of the {expected} test images in the manifest were not read "
                "(corrupt or truncated shards); the metrics cover the rest"
            )
            report["warning"] = f"{report['warning']} {lost}" if report["warning"] else lost
            rank_zero_warn(lost)
        folder = Path(self.out_dir) / (self.name or run_name(trainer))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (folder / "table_row.md").write_text(table_markdown(folder.name, report), encoding="utf-8")
        if self._grid is not None:
            save_image(self._grid, folder / "reconstructions.png")
        if report["stand_ins"]:
            rank_zero_warn(report["warning"])
        print(f"evaluation report: {folder}/metrics.json, table_row.md, reconstructions.png")


def run_name(trainer: L.Trainer) -> str:
    """The CLI links trainer.default_root_dir to runs/<run_name>; without the CLI, its folder name."""
    return Path(trainer.default_root_dir).resolve().name or "flowmo"


# ------------------------------------------------------------------------------------------- the report
def build_report(
    trainer: L.Trainer,
    pl_module: L.LightningModule,
    num_images: int,
    resolution: tuple[int, int] | None,
    wall_time_s: float,
) -> dict[str, Any]:
    hp = pl_module.hparams
    config = pl_module.config
    stand_ins = list(pl_module.stand_ins)
    settings = pl_module.sampler
    report: dict[str, Any] = {
        "metrics": collected_metrics(trainer, pl_module),
        "num_images": num_images,
        "sampler": {**settings.to_dict(), "seed": hp.seed, "nfe": settings.nfe},
        "weights": evaluated_weights(trainer, pl_module),
        "weights_record": _weights_record(pl_module),  # step, EMA updates and decay (flowmo.optim.weights_record)
        "checkpoint": trainer.ckpt_path,
        "init_weights": pl_module.init_settings.weights,
        "bits_per_pixel": config.bits_per_pixel_at(*resolution) if resolution else config.bits_per_pixel,
        "tokens_x_vocab": tokens_times_vocab(pl_module.tokenizer.quantizer, config.code_length),
        "resolution": list(resolution) if resolution else None,
        "stand_ins": stand_ins,
        "warning": stand_in_warning(stand_ins),
        "precision": str(trainer.precision),
        "world_size": trainer.world_size,
        "wall_time_s": round(wall_time_s, 2),
        "model": {"hparams": _plain(dict(hp)), "architecture": config.to_dict()},
        "data": _plain(dict(trainer.datamodule.hparams)) if trainer.datamodule is not None else None,
        "versions": {
            "flowmo": __version__,
            "torch": torch.__version__,
            "lightning": L.__version__,
            "python": platform.python_version(),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if resolution and tuple(resolution) != (config.image_size, config.image_size):  # same code, other pixels
        report["bits_per_pixel_at_training_size"] = config.bits_per_pixel
    return report


def evaluated_size(trainer: L.Trainer, config) -> int:
    """The side of the images this test decodes: the data's image_size, else the architecture's."""
    hparams = getattr(trainer.datamodule, "hparams", None) or {}
    return int(hparams.get("image_size") or config.image_size)


def evaluated_weights(trainer: L.Trainer, pl_module: L.LightningModule) -> str:
    """ "ema" or "raw": what the sampler ran. Weights loaded through model.init (e.g. the authors' .pth) fill both
    copies, so then init.weights_from decides; a checkpoint holds both and eval.use_ema picks."""
    if pl_module.init_settings.weights and not trainer.ckpt_path:
        return pl_module.init_settings.weights_from
    return "ema" if pl_module.eval_settings.use_ema else "raw"


def _weights_record(pl_module: L.LightningModule) -> dict | None:
    record = getattr(pl_module, "evaluated_weights", None)
    return record() if callable(record) else None


def collected_metrics(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
    """The module's reduced test results; the logged `test/*` values if the module kept none."""
    metrics = getattr(pl_module, "last_test_metrics", None)
    if metrics:
        return {k: float(v) for k, v in metrics.items()}
    return {k.split("/", 1)[1]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}


def tokens_times_vocab(quantizer, code_length: int) -> str:
    """Table 1's "tokens × vocab": Lo is 256 × 2^18; Hi is quoted in its 14-bit sub-tokens, 1024 × 2^14
    (as LlamaGen-32, its row partner), since a 2^56 vocabulary compares with nothing. A code whose ids are not
    bit words (FSQ, continuous) is quoted in bits per token."""
    if quantizer.id_bits is None:
        return f"{code_length} × {quantizer.bits_per_token:g} bits"
    per_token = int(quantizer.bits_per_token)
    bits = per_token if per_token <= 18 else quantizer.id_bits
    return f"{code_length * per_token // bits} × 2^{bits}"


def stand_in_warning(stand_ins: list[str]) -> str | None:
    if not stand_ins:
        return None
    return (
        f"STAND-IN NETWORKS WITH RANDOM WEIGHTS: {', '.join(stand_ins)}. The metrics that use them mean "
        "nothing and are not comparable to the paper (model.feature_weights=random is for tests and the demo)."
    )


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe copy: tuples to lists, anything exotic to its string."""
    return json.loads(json.dumps(values, default=str))


# ------------------------------------------------------------------------------------------- Markdown
def _cell(metrics: dict[str, float], key: str, digits: int) -> str:
    return f"{metrics[key]:.{digits}f}" if key in metrics else "–"


def table_markdown(name: str, report: dict[str, Any]) -> str:
    """Table 1's header and one row (paper-compatible PSNR/SSIM), then the correct values and the protocol."""
    m, s = report["metrics"], report["sampler"]
    preset = report["model"]["hparams"].get("preset")
    # the row says what was evaluated: `make eval-lo CKPT=<a tiny checkpoint>` must not read as FlowMo-Lo
    label = name if not preset or preset in name else f"{name} [{preset} architecture]"
    label = f"{label} (STAND-IN NETS)" if report["stand_ins"] else label
    row = (
        f"| {label} | {report['bits_per_pixel']:.3f} | {report['tokens_x_vocab']} | {_cell(m, 'rfid', 2)} | "
        f"{_cell(m, 'psnr_paper', 2)} | {_cell(m, 'ssim_paper', 3)} | {_cell(m, 'lpips_alex', 3)} |"
    )
    notes = [
        f"PSNR/SSIM as the paper computes them (uint8 truncation, PSNR pooled over each batch of 5); "
        f"correct per-image values: PSNR {_cell(m, 'psnr', 2)}, SSIM {_cell(m, 'ssim', 3)}. "
        f"LPIPS: AlexNet; VGG {_cell(m, 'lpips_vgg', 3)}.",
        f"{report['num_images']} images, {report['weights']} weights, {s['steps']} steps, rho {s['rho']:g}, "
        f"CFG {s['cfg']:g} on sigma {s['cfg_interval']}, seed {s['seed']} ({s['nfe']} NFE), {report['precision']}.",
    ]
    if report["warning"]:
        notes.insert(0, f"**{report['warning']}**")
    return "\n".join([TABLE_HEADER, row, ""] + notes) + "\n"
