"""Figures a person reads: a labelled reconstruction grid and training curves (matplotlib, no display needed).

    reconstruction_figure("grid.png", {"input": x, "Stage 1A": r1, "Stage 1B": r2}, row_psnr={...})
    training_curves_figure("curves.png", stages, baselines={"mean colour": 20.3})

Images are [B, 3, H, W] tensors in [-1, 1]; they are drawn with nearest-neighbour enlargement, so a 32 px
reconstruction shows its real pixels instead of a blur.
"""

from __future__ import annotations

from pathlib import Path

import torch

CELL_INCHES = 1.45  # one image of the grid; 32 px at dpi 110 -> ~5x nearest-neighbour enlargement


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: works on a headless cluster node
    import matplotlib.pyplot as plt

    return plt


def _as_rgb(image: torch.Tensor):
    """[3, H, W] in [-1, 1] -> HWC numpy in [0, 1]."""
    return ((image.detach().float().cpu() + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy()


def reconstruction_figure(
    path: str | Path, columns: dict[str, torch.Tensor], row_psnr: dict[str, torch.Tensor] | None = None, title: str = ""
) -> Path:
    """A row per image, a labelled column per tensor; under each column named in `row_psnr`, that row's PSNR."""
    plt = _pyplot()
    row_psnr = row_psnr or {}
    rows = next(iter(columns.values())).shape[0]
    fig, axes = plt.subplots(
        rows, len(columns), squeeze=False, figsize=(CELL_INCHES * len(columns), CELL_INCHES * rows + 0.6)
    )
    for col, (label, images) in enumerate(columns.items()):
        axes[0, col].set_title(label, fontsize=10, fontweight="bold")
        for row in range(rows):
            axis = axes[row, col]
            axis.imshow(_as_rgb(images[row]), interpolation="nearest")
            axis.set_xticks([]), axis.set_yticks([])
            if label in row_psnr:
                axis.set_xlabel(f"{float(row_psnr[label][row]):.1f} dB", fontsize=8, labelpad=2)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path, plt)


def training_curves_figure(
    path: str | Path,
    stages: dict[str, dict[str, list[tuple[int, float]]]],
    baselines: dict[str, float] | None = None,
    loss_tag: str = "train/flow",
    metric_tag: str = "val/psnr",
) -> Path:
    """Two panels against optimizer steps: the training loss, and the validation metric with baseline lines.

    stages: {stage label: {tag: [(step, value), ...]}} in training order; each stage's steps continue where
    the previous stage ended, so Stage 1B is drawn after Stage 1A.
    """
    plt = _pyplot()
    fig, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(11, 4))
    offset = 0
    for label, curves in stages.items():
        for axis, tag in ((loss_axis, loss_tag), (metric_axis, metric_tag)):
            points = curves.get(tag, [])
            if points:
                steps, values = zip(*points)
                if axis is loss_axis:
                    values = _running_mean(values)
                axis.plot(
                    [offset + s for s in steps],
                    values,
                    marker="o" if axis is metric_axis else None,
                    markersize=3,
                    linewidth=1,
                    label=label,
                )
        offset += max((step for points in curves.values() for step, _ in points), default=0)
    for name, value in (baselines or {}).items():
        metric_axis.axhline(value, linestyle="--", linewidth=1, color="gray")
        metric_axis.text(
            0.01,
            value,
            f" {name}: {value:.1f} dB",
            transform=metric_axis.get_yaxis_transform(),
            fontsize=8,
            va="bottom",
            color="dimgray",
        )
    loss_axis.set(
        xlabel="optimizer step", ylabel=loss_tag, title="training loss (running mean of 10 logs)", yscale="log"
    )
    metric_axis.set(xlabel="optimizer step", ylabel=metric_tag + " (dB)", title="held-out photos, EMA, paper sampler")
    for axis in (loss_axis, metric_axis):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path, plt)


def _running_mean(values, window: int = 10) -> list[float]:
    """Smooth a noisy per-step loss for reading (the flow loss varies with the sampled t)."""
    return [sum(values[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def _save(fig, path: str | Path, plt) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_scalars(log_dir: str | Path, tags: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from the TensorBoard event files under log_dir (all versions, in order)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves: dict[str, list[tuple[int, float]]] = {tag: [] for tag in tags}
    for events in sorted(Path(log_dir).glob("version_*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        available = set(accumulator.Tags().get("scalars", []))
        for tag in tags:
            if tag in available:
                curves[tag] += [(event.step, event.value) for event in accumulator.Scalars(tag)]
    return curves
