"""`make bench` (`python -m flowmo.bench.model`): ms per call, images/s, peak memory and FLOP utilisation of the
FlowMo workloads.

    python -m flowmo.bench.model                                  # tiny, batch 8, fp32, cuda if present
    python -m flowmo.bench.model --preset cpu-mid --profile       # + where the time goes, by operator group
    python -m flowmo.bench.model --preset cpu-mid --scaling       # + time/memory against batch and image size
    python -m flowmo.bench.model --preset lo --batch 8 --precision bf16 --compile
    python -m flowmo.bench.model --count-only --preset tiny small lo hi   # FLOPs/params only, no timing

Workloads (method §3-5), named by their `stage` in the rows:
  1a      a Stage-1A optimizer step: encoder + decoder forward and backward through `flowmo_loss` (flow MSE +
          quantizer losses, + LPIPS-VGG on the x0 estimate with --feature-nets random), then Adam (the kernel the
          training module picks), the weight-norm projection, and the EMA at the module's cadence (every 10th call).
  1b      a Stage-1B optimizer step: encoder without grad, decoder flow loss + the 8-step checkpointed chain
          sample, backward through the chain, then the same update. The sample loss is a pixel MSE
          (--feature-nets off) or a random-weight ResNet-50 logit distance (random).
  encode  encoder + LFQ indices (inference; the input range check is skipped: it is validation, not model).
  decode  `detokenize`: the paper's 25-step rho=4 sampler with CFG 1.5 on its interval = 31 NFE.

Every run writes its rows into results/bench/bench.json (--json to change; rows with the same preset, stage,
device, dtype, batch, image size, compile flag and label are replaced, others kept, so runs accumulate). A row:
preset, stage, device, dtype, batch, image_size, ms (median per call), images_per_s, peak_mem_mb (MiB; GPU: max
allocated, CPU: RSS growth), model_flops (per call: forward + backward for training, counted once by
`torch.utils.flop_counter` on fake tensors with the math attention backend, optimizer excluded), utilisation
(model FLOP/s over the FLOP/s of an NxN matmul timed in the same run at the same dtype and device), plus min_ms,
compile, threads, torch, code (git revision of the model code) and label. Printed figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from flowmo import presets
from flowmo.bench.counts import count_report, print_counts
from flowmo.bench.measure import matmul_flops_per_s, peak_memory, print_profile, profile_call, time_calls
from flowmo.bench.workloads import (
    TRAINING,
    WORKLOADS,
    build_bundle,
    build_feature_nets,
    flops_per_image,
    free_grads,
    make_images,
    make_indices,
    parameter_counts,
    workload_fn,
)
from flowmo.flow import SAMPLERS


@dataclass
class Row:
    preset: str
    stage: str
    device: str
    dtype: str
    batch: int
    image_size: int
    ms: float  # median per call
    images_per_s: float
    peak_mem_mb: float | None  # MiB
    model_flops: float  # per call (the whole batch)
    utilisation: float
    min_ms: float  # the best call: the steadier figure on a shared or throttled machine
    memory_kind: str
    compile: bool
    threads: int
    torch: str
    code: str
    label: str
    all_ms: list[float] = field(default_factory=list)
    profile: dict | None = None


def precision_context(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class Setting:
    """What one row measures besides the workload: everything the Row copies from the run."""

    preset: str
    device: torch.device
    batch: int
    image_size: int
    flops_per_image: float
    matmul: float


def measure(stage: str, fn, args, setting: Setting) -> Row:
    memory: dict = {}
    with peak_memory(setting.device, memory), precision_context(setting.device, args.precision):
        seconds = time_calls(fn, setting.device, args.warmup, args.iters)
        profile = profile_call(fn, setting.device) if args.profile else None
    median = statistics.median(seconds)
    flops = setting.batch * setting.flops_per_image
    return Row(
        setting.preset,
        stage,
        describe_device(setting.device),
        args.precision,
        setting.batch,
        setting.image_size,
        1e3 * median,
        setting.batch / median,
        memory["peak_mib"],
        flops,
        flops / median / setting.matmul,
        1e3 * min(seconds),
        memory["memory_kind"],
        args.compile,
        torch.get_num_threads(),
        torch.__version__,
        code_revision(),
        args.label,
        [1e3 * s for s in seconds],
        profile,
    )


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def reference_matmul(args, device: torch.device) -> tuple[int, float]:
    """(N, FLOP/s) of the same-run matmul. bf16 only on a GPU: a CPU's bf16 matmul is emulated (2048^2 took 20 s
    a call on this project's 2-core CI machine), so it measures the emulation, not what the CPU can do."""
    dtype = torch.bfloat16 if args.precision == "bf16" and device.type != "cpu" else torch.float32
    size = args.matmul_size or (4096 if device.type == "cuda" else 2048)
    return size, matmul_flops_per_s(device, dtype, size, iters=20 if device.type == "cuda" else 5)


def benchmark_preset(
    preset: str, args, device: torch.device, batch: int, image_size: int | None, workloads: list[str], matmul: float
) -> list[Row]:
    """Time the selected workloads of one preset at one (batch, image size)."""
    flops = flops_per_image(preset, batch, args.feature_nets, image_size, workloads, args.checkpointing, args.sampler)
    bundle = build_bundle(
        preset, device, build_feature_nets(args.feature_nets, device), image_size, args.feature_nets, args.checkpointing
    )
    bundle.sampler = args.sampler
    if args.compile:  # as module.py does: compile the two transformers, keep the loss code eager
        bundle.tokenizer.encoder.compile()
        bundle.tokenizer.decoder.compile()
    if any(stage in TRAINING for stage in workloads):
        bundle.attach_update(device)
    images = make_images(bundle, batch, device)
    indices = make_indices(bundle, images)
    rows = []
    for stage in workloads:
        free_grads(bundle.tokenizer)  # else the last step's gradients count in the next workload's peak memory
        setting = Setting(preset, device, batch, bundle.image_size, flops[stage], matmul)
        rows.append(measure(stage, workload_fn(stage, bundle, images, indices), args, setting))
    return rows


def scaling_rows(preset: str, args, device: torch.device, matmul: float) -> list[Row]:
    """1A step and decode against batch (at the preset's size) and image size (at --batch): how cost grows."""
    config = presets.get(preset)
    rows = []
    for batch in args.scaling_batches:
        rows += benchmark_preset(preset, args, device, batch, args.image_size, ["1a", "decode"], matmul)
        print_rows(rows[-2:])
    for factor in (0.5, 2.0):
        size = int(config.image_size * factor) // config.patch_size * config.patch_size
        rows += benchmark_preset(preset, args, device, args.batch, size, ["1a", "decode"], matmul)
        print_rows(rows[-2:])
    return rows


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"


def code_revision() -> str:
    """The git revision of the flowmo package under test (+dirty), so before/after rows say what they timed."""
    folder = Path(__file__).resolve().parents[1]  # the flowmo package
    try:
        rev = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--", "."], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


# ------------------------------------------------------------------------------------------ bench.json
ROW_KEY = ("preset", "stage", "device", "dtype", "batch", "image_size", "compile", "label")


def merge_rows(path: Path, rows: list[dict], fresh: bool) -> list[dict]:
    """The file's rows with these rows replacing the ones they measure again (same ROW_KEY)."""
    old = [] if fresh or not path.exists() else json.loads(path.read_text())
    new_keys = {tuple(row[k] for k in ROW_KEY) for row in rows}
    kept = [row for row in old if tuple(row.get(k) for k in ROW_KEY) not in new_keys]
    return kept + rows


def write_rows(path: Path, rows: list[Row], fresh: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = merge_rows(path, [asdict(row) for row in rows], fresh)
    partial = path.with_name(f".{path.name}.partial")  # renamed over the file: a run killed mid-write (a gpu-check
    partial.write_text(json.dumps(merged, indent=1))  # deadline) leaves the previous rows, never half a file
    os.replace(partial, path)
    print(f"wrote {len(rows)} rows to {path} ({len(merged)} in all)")


# ------------------------------------------------------------------------------------------ printing
def _mem(row: Row) -> str:
    return "n/a" if row.peak_mem_mb is None else f"{row.peak_mem_mb:.0f} MiB"


def print_header(preset: str, args, device: torch.device, matmul_size: int, matmul: float) -> None:
    config = presets.get(preset)
    params = parameter_counts(preset)["total"] / 1e6
    print(
        f"\nFlowMo {preset} ({config.image_size}x{config.image_size}, {params:.2f}M params), "
        f"{args.precision}{' + compile' if args.compile else ''}, {describe_device(device)}, torch "
        f"{torch.__version__}, feature nets {args.feature_nets}, code {code_revision()}"
    )
    matmul_dtype = args.precision if device.type != "cpu" else "fp32"
    print(
        f"reference matmul {matmul_size}^2 {matmul_dtype}: {matmul / 1e9:.1f} GFLOP/s; median of {args.iters} "
        f"after {args.warmup} warm-up; decode = {SAMPLERS[args.sampler].nfe} NFE"
    )
    print(
        f"{'stage':<8}{'batch':>6}{'size':>6}{'ms/call':>11}{'min ms':>10}{'img/s':>10}{'peak mem':>12}"
        f"{'GFLOP/call':>12}{'util':>8}"
    )


def print_rows(rows: list[Row]) -> None:
    for row in rows:
        print(
            f"{row.stage:<8}{row.batch:>6}{row.image_size:>6}{row.ms:>11.2f}{row.min_ms:>10.2f}"
            f"{row.images_per_s:>10.1f}{_mem(row):>12}{row.model_flops / 1e9:>12.4g}{row.utilisation:>8.1%}"
        )
        if row.profile is not None:
            print_profile(row.stage, row.profile)


def print_footer(rows: list[Row]) -> None:
    print(
        f"peak mem: {rows[0].memory_kind if rows else ''}; util = model FLOP/s / matmul FLOP/s; training rows are "
        "a whole optimizer step (forward, backward, Adam, projection, EMA every 10th)"
    )


# ------------------------------------------------------------------------------------------ entry point
DEFAULT_JSON = Path("results/bench/bench.json")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--preset", nargs="+", default=["tiny"], choices=presets.names())
    parser.add_argument("--batch", type=int, default=8, help="images per call (a micro-batch for training)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 = bf16 autocast")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--compile", action="store_true", help="torch.compile encoder and decoder")
    parser.add_argument(
        "--feature-nets",
        choices=("off", "random"),
        default="off",
        help="off: no LPIPS, pixel MSE as 1B sample loss; random: random-weight LPIPS-VGG / ResNet-50",
    )
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument(
        "--checkpointing",
        default="none",
        help="activation checkpointing of the training steps: none, blocks, every_K (lo/hi: every_4)",
    )
    parser.add_argument("--sampler", choices=tuple(SAMPLERS), default="paper", help="the decode workload's sampler")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5, help="timed calls per workload (median reported)")
    parser.add_argument("--image-size", type=int, default=None, help="default: the preset's training size")
    parser.add_argument("--matmul-size", type=int, default=None, help="reference matmul N (default 4096 GPU, 2048 CPU)")
    parser.add_argument(
        "--matmul-precision",
        choices=("highest", "high", "medium"),
        default="highest",
        help="torch.set_float32_matmul_precision (training uses medium = TF32 on GPU)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after timing, profile one call per workload: self time by operator group and top ops",
    )
    parser.add_argument(
        "--scaling",
        action="store_true",
        help="also time the 1A step and the decode against batch and image size (half, double)",
    )
    parser.add_argument("--scaling-batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--label", default="", help="a tag stored in each row, e.g. before / after a change")
    parser.add_argument("--count-only", action="store_true", help="print FLOPs and params per preset, no timing")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="rows are merged into this file")
    parser.add_argument("--fresh", action="store_true", help="start the JSON file over instead of merging")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_float32_matmul_precision(args.matmul_precision)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.count_only:
        reports = [count_report(p, args.batch, args.feature_nets, args.image_size) for p in args.preset]
        print_counts(reports)
        return 0
    device = pick_device(args.device)
    matmul_size, matmul = reference_matmul(args, device)
    rows: list[Row] = []
    for preset in args.preset:
        print_header(preset, args, device, matmul_size, matmul)
        preset_rows = benchmark_preset(preset, args, device, args.batch, args.image_size, args.workloads, matmul)
        print_rows(preset_rows)
        if args.scaling:
            preset_rows += scaling_rows(preset, args, device, matmul)
        print_footer(preset_rows)
        rows += preset_rows
    write_rows(args.json, rows, args.fresh)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
